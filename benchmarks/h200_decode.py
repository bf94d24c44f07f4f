"""Whole-model decode on the H200: AdaFuse (pre-gate + fused kernels) against the dense base,
the conventional dynamic adapter, and what users run today (transformers + PEFT / mixlora).

One run builds the kernels, checks the GPU decoder against the CPU reference on the tiny
fixture, then times every variant side by side. Prints a table, writes JSON (+ a PNG plot).

  PYTHONPATH=. python3 benchmarks/h200_decode.py --out $OUT [--hf] [--quick]
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adafuse_export.converters import load_checkpoint  # noqa: E402
from adafuse_export.examples import make_example  # noqa: E402
from adafuse_export.reference import ReferenceModel, route_topk, routing_table  # noqa: E402
from adafuse_export.runners.torch_cuda import GpuDecoder, KernelOps, SiteWeights, weight_bytes  # noqa: E402
from adafuse_export.spec import AdapterSpec, ModelSpec  # noqa: E402

LLAMA2_7B = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
             "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096}
DEVICE = "cuda"
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------- correctness on the tiny fixture
def check_tiny(ops) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as d:
        make_example(d, "pregate", seed=11)
        ckpt = load_checkpoint(d)
        ref = ReferenceModel(ckpt)
        prompt = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(1))
        tokens, steps = ref.generate(prompt, 16)
        for dtype in (torch.float32, torch.bfloat16):
            for strategy in ("fused", "switch", "unmerged"):
                dec = GpuDecoder.from_checkpoint(ckpt, device=DEVICE, dtype=dtype, strategy=strategy, max_seq=64, ops=ops)
                logits = dec.prefill(prompt.to(DEVICE))
                errs = [float(torch.linalg.norm(logits.cpu() - steps[0].logits) / torch.linalg.norm(steps[0].logits))]
                for i, step in enumerate(steps[1:]):
                    # follow the reference's tokens so errors don't compound; graph replay for decode
                    lg = dec.decode(tokens[:, i:i + 1].to(DEVICE))
                    errs.append(float(torch.linalg.norm(lg.cpu() - step.logits) / torch.linalg.norm(step.logits)))
                gen = dec.generate(prompt.to(DEVICE), 16).cpu()
                agree = float((gen == tokens).float().mean())
                key = f"{strategy}/{str(dtype).split('.')[-1]}"
                tol = 1e-5 if dtype == torch.float32 else 3e-2
                out[key] = {"max_rel_err": max(errs), "greedy_agreement": agree, "tol": tol,
                            "pass": max(errs) < tol and (agree == 1.0 or dtype != torch.float32)}
                log(f"tiny {key:<22} max rel err {max(errs):.2e}  greedy agreement {agree:.2f}  "
                    f"{'PASS' if out[key]['pass'] else 'FAIL'}")
    return out


# ---------------------------------------------------------------- timing helpers
def time_steps(fn, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    if DEVICE != "cuda":  # --smoke on the CPU: wall clock
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth() -> float:
    n = 2 * 1024**3 if DEVICE == "cuda" else 64 * 1024**2
    x = torch.randint(0, 255, (n,), dtype=torch.uint8, device=DEVICE)
    y = torch.empty_like(x)
    ms = time_steps(lambda: y.copy_(x), 20)
    del x, y
    return 2 * n / (ms * 1e-3)  # bytes read + written per second


class ConventionalDecoder(GpuDecoder):
    """The usual dynamic adapter: a router in every adapted linear, one small matmul pair per expert
    (MoLA/PEFT-style eager code; every expert is evaluated under a routing mask, no host syncs)."""

    def __init__(self, *a, routers: dict, **kw):
        super().__init__(*a, fuse_projections=False, **kw)  # as users' code runs it: one matmul per projection
        self.routers = routers

    def _linear(self, x, layer, mod, ids, gates):
        site: SiteWeights = self.sites[(layer, mod)]
        y = x @ site.W.T
        e_ids, e_g = route_topk(x, self.routers[site.name], None, self.a.top_k, True)
        e_g = e_g.to(x.dtype)
        for e in range(site.A.shape[0]):
            w = (e_g * (e_ids == e)).sum(-1, keepdim=True)
            y = y + w * ((x @ site.A[e].T) @ site.B[e].T) * site.scale
        return y


def random_7b(rank: int, experts: int, top_k: int, dtype=torch.bfloat16, config=None):
    spec = ModelSpec.from_hf_config(config or LLAMA2_7B, "llama-2-7b shape")
    adapter = AdapterSpec(num_experts=experts, top_k=top_k, r=rank, lora_alpha=2.0 * rank, target_modules=tuple(ALL))
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, device=DEVICE, generator=g, dtype=torch.float32) * std).to(dtype)

    w = {}
    for name, shape in spec.hf_weight_shapes().items():
        w[name] = (1.0 + rnd(*shape, std=0.05)) if name.endswith("norm.weight") else rnd(*shape)
    for layer in range(spec.num_layers):
        for m in ALL:
            out, inp = spec.linear_shape(m)
            w[f"layers.{layer}.{m}.lora_A"] = rnd(experts, rank, inp, std=0.02)
            w[f"layers.{layer}.{m}.lora_B"] = rnd(experts, out, rank, std=0.02)
    pregate = rnd(experts, spec.hidden_size, std=1.0).float()
    routes = routing_table(spec, w["model.embed_tokens.weight"].float(), w["model.layers.0.input_layernorm.weight"].float(),
                           pregate, None, top_k, True)
    routers = {f"layers.{l}.{m}": rnd(experts, spec.linear_shape(m)[1], std=1.0)
               for l in range(spec.num_layers) for m in ALL}
    return spec, adapter, w, routes, routers


def tokens_with_changing_routes(routes, n: int) -> list[int]:
    ids = routes[0].cpu()
    gen = torch.Generator().manual_seed(5)
    out = [int(torch.randint(0, ids.shape[0], (1,), generator=gen))]
    while len(out) < n:
        t = int(torch.randint(0, ids.shape[0], (1,), generator=gen))
        if not torch.equal(ids[t], ids[out[-1]]):
            out.append(t)
    return out


def time_decoder(dec: GpuDecoder, batch: int, ctx: int, steps: int, feed: list[int], use_graph: bool) -> float:
    """Median ms per decode step. Row r of step k takes feed[(k * batch + r) % len(feed)]: every row
    has its own token and route (consecutive entries of `feed` differ in route), as a real batch has."""
    prompt = torch.randint(0, dec.m.vocab_size, (batch, ctx), device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(3))
    dec.prefill(prompt)
    n = max(1, len(feed) // batch)
    batches = [torch.tensor([feed[(k * batch + r) % len(feed)] for r in range(batch)], dtype=torch.int64).view(batch, 1).to(DEVICE)
               for k in range(n)]
    it = itertools.cycle(batches)

    def step():
        dec.decode(next(it), use_graph=use_graph)
    return time_steps(step, steps)


def run_variants(variants, rank, batch, ctx, steps, bw, results):
    floor_ms = None
    for name, make, graph, feed in variants:
        dec = make()
        if floor_ms is None:
            floor_ms = weight_bytes(dec) / bw * 1e3
        ms = time_decoder(dec, batch, ctx, steps, feed, graph)
        row = {"rank": rank, "batch": batch, "ctx": ctx, "variant": name, "ms_per_step": ms,
               "tokens_per_s": batch / ms * 1e3, "weight_read_floor_ms": floor_ms}
        results["decode"].append(row)
        log(f"r={rank:<3} b={batch:<2} ctx={ctx:<5} {name:<42} {ms:8.2f} ms/step {batch / ms * 1e3:8.0f} tok/s  (floor {floor_ms:.2f})")
        del dec
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


def bench_curve(ops, batches, ctxs, base_ctx, steps, results, config=None):
    """Dense and fused at r16: the tokens/s curve over `batches` at context base_ctx, and batch 1 at
    each context of `ctxs` (the attention share)."""
    bw = results.get("copy_bandwidth_GBps", 0) * 1e9 or copy_bandwidth()
    spec, adapter, w, routes, _ = random_7b(16, 8, 2, config=config)
    changing = tokens_with_changing_routes(routes, (steps + 8) * max(batches + [1]))
    for batch, ctx in [(b, base_ctx) for b in batches] + [(1, c) for c in ctxs]:
        common = dict(max_batch=batch, max_seq=ctx + 4 * (steps + 8), ops=ops)
        run_variants([("dense base", lambda: GpuDecoder(spec, None, w, None, strategy="dense", **common), True, changing),
                      ("adafuse fused (graph)", lambda: GpuDecoder(spec, adapter, w, routes, strategy="fused", **common), True, changing)],
                     16, batch, ctx, steps, bw, results)


def bench_7b(ops, ranks, batches, ctx, steps, results, config=None, torch_ops=None, full=True):
    """Every variant at every (rank, batch), context ctx. `full` adds the conventional, unmerged and
    switch rows (slow; batch <= 8); `torch_ops` (KernelOps without the step kernels) adds the
    dense and fused rows with the work between the projections in PyTorch ops, for A/B."""
    bw = copy_bandwidth()
    results["copy_bandwidth_GBps"] = bw / 1e9
    log(f"device-to-device copy: {bw / 1e9:.0f} GB/s (read + write)")
    for rank in ranks:
        spec, adapter, w, routes, routers = random_7b(rank, 8, 2, config=config)
        changing = tokens_with_changing_routes(routes, (steps + 8) * max(batches))
        same = [changing[0]]
        for batch in batches:
            common = dict(max_batch=batch, max_seq=ctx + 4 * (steps + 8), ops=ops)
            variants = [
                ("dense base", lambda: GpuDecoder(spec, None, w, None, strategy="dense", **common), True, changing),
                ("adafuse fused (graph)", lambda: GpuDecoder(spec, adapter, w, routes, strategy="fused", **common), True, changing),
            ]
            if torch_ops is not None:  # the dense model through the library's GEMV instead of cuBLAS
                gcommon = dict(common, ops=KernelOps(ops.k, dense_gemv=True))
                variants.insert(1, ("dense base, kernel GEMV", lambda: GpuDecoder(spec, None, w, None, strategy="dense", **gcommon),
                                    True, changing))
            if torch_ops is not None and batch in (1, 8):
                tcommon = dict(common, ops=torch_ops)
                variants += [
                    ("dense base, torch step ops", lambda: GpuDecoder(spec, None, w, None, strategy="dense", **tcommon), True, changing),
                    ("adafuse fused, torch step ops", lambda: GpuDecoder(spec, adapter, w, routes, strategy="fused", **tcommon), True, changing),
                ]
            if full and batch <= 8:
                variants += [
                    ("conventional (eager)", lambda: ConventionalDecoder(spec, adapter, w, routes, strategy="unmerged", routers=routers, **common), False, changing),
                    ("conventional (graph)", lambda: ConventionalDecoder(spec, adapter, w, routes, strategy="unmerged", routers=routers, **common), True, changing),
                    ("adafuse unmerged torch (graph)", lambda: GpuDecoder(spec, adapter, w, routes, strategy="unmerged", **common), True, changing),
                ]
            if full and batch == 1:
                variants += [
                    ("dense base, unfused q/k/v + gate/up", lambda: GpuDecoder(spec, None, w, None, strategy="dense", fuse_projections=False, **common), True, changing),
                    ("adafuse fused, unfused q/k/v + gate/up", lambda: GpuDecoder(spec, adapter, w, routes, strategy="fused", fuse_projections=False, **common), True, changing),
                ]
                sw = lambda: GpuDecoder(spec, adapter, {k: (v.clone() if k.endswith("proj.weight") else v) for k, v in w.items()},
                                        routes, strategy="switch", **common)
                variants += [("adafuse switch, route changes (graph)", sw, True, changing),
                             ("adafuse switch, route unchanged (graph)", sw, True, same)]
            run_variants(variants, rank, batch, ctx, steps, bw, results)
        if full:
            bench_switch_kernel(ops, spec, adapter, w, routes, changing, rank, bw, results)
        del w, routers
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


def bench_switch_kernel(ops, spec, adapter, w, routes, changing, rank, bw, results):
    """The switch kernel alone: all 224 sites, route changing each call, pristine mode."""
    wl = {k: (v.clone() if k.endswith("proj.weight") else v) for k, v in w.items()}
    dec = GpuDecoder(spec, adapter, wl, routes, strategy="switch", max_batch=1, max_seq=8, ops=ops)
    sites = dec.switch_sites
    pairs = [(routes[0][t].to(DEVICE), routes[1][t].to(DEVICE)) for t in changing[:16]]
    it = itertools.cycle(pairs)

    def one():
        i, g = next(it)
        ops.switch(sites, i, g, dec.old_ids, dec.old_gates)
    ms = time_steps(one, 20)
    moved = sum(2 * s.W.numel() * s.W.element_size() + s.A.shape[1] * 2 * (s.W.shape[0] + s.W.shape[1]) * s.W.element_size()
                for s in sites)
    results["switch_kernel"].append({"rank": rank, "ms": ms, "bytes": moved, "GBps": moved / ms / 1e6,
                                     "fraction_of_copy": moved / (ms * 1e-3) / bw})
    log(f"r={rank} switch kernel: {ms:.2f} ms, {moved / ms / 1e6:.0f} GB/s = {moved / (ms * 1e-3) / bw:.0%} of copy")


# ---------------------------------------------------------------- transformers baselines
def hf_random_llama():
    """A random-weight Llama-2-7B in transformers, bf16, on the GPU."""
    import transformers

    cfg = transformers.LlamaConfig(**{k: v for k, v in LLAMA2_7B.items() if k != "model_type"})
    torch.manual_seed(0)
    with torch.device("cuda"):
        return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def hf_generate_seconds(model, prompt, n: int) -> float:
    """Wall seconds of one greedy `generate` of exactly n new tokens."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def bench_hf(ctx: int, new_tokens: int, results):
    model = hf_random_llama()
    prompt = torch.randint(0, 32000, (1, ctx), device="cuda")

    def per_token(m):
        def gen(n):
            return hf_generate_seconds(m, prompt, n)
        gen(2)
        one = statistics.median(gen(1) for _ in range(3))
        many = statistics.median(gen(new_tokens) for _ in range(3))
        return (many - one) / (new_tokens - 1) * 1e3

    rows = [("transformers dense", per_token(model))]
    log(f"HF dense: {rows[-1][1]:.1f} ms/token")
    import peft

    lora = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=ALL, init_lora_weights=False))
    rows.append(("transformers + PEFT LoRA r16 (unmerged)", per_token(lora)))
    log(f"HF PEFT: {rows[-1][1]:.1f} ms/token")
    model = lora.unload()
    try:
        import mixlora

        with tempfile.TemporaryDirectory() as d:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            import fixtures_real as fr

            (Path(d) / "base").mkdir()
            (Path(d) / "base" / "config.json").write_text(json.dumps(LLAMA2_7B))
            fr.write_moe_peft_synthetic(Path(d) / "mx", Path(d) / "base", "mixlora", num_experts=8, top_k=2, r=16, lora_alpha=32)
            config, weights = mixlora.load_adapter_weights(str(Path(d) / "mx"), device="cuda", dtype=torch.bfloat16)
            mixlora.inject_adapter_in_model(model, config, weights)
        rows.append(("transformers + mixlora MixLoRA 8x r16 top-2", per_token(model)))
        log(f"HF MixLoRA: {rows[-1][1]:.1f} ms/token")
    except Exception as e:  # report, don't hide
        results["hf_errors"] = f"mixlora: {type(e).__name__}: {e}"
        log(f"mixlora baseline failed: {type(e).__name__}: {e}")
    results["hf"] = [{"variant": n, "ms_per_token": v, "ctx": ctx} for n, v in rows]
    del model
    gc.collect()
    torch.cuda.empty_cache()


def bench_hf_compiled(ctx: int, new_tokens: int, results):
    """transformers' own fast path for the dense model: `generate` with a static KV cache, which
    makes it torch.compile the decoding forward itself (CompileConfig, mode reduce-overhead: CUDA
    graphs; the prefill stays eager)."""
    import transformers

    model = hf_random_llama()
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = transformers.CompileConfig(fullgraph=True, mode="reduce-overhead")
    prompt = torch.randint(0, 32000, (1, ctx), device="cuda")

    def gen(n):
        return hf_generate_seconds(model, prompt, n)
    t0 = time.perf_counter()
    gen(new_tokens)  # compiles (prefill and decode shapes)
    gen(new_tokens)
    compile_s = time.perf_counter() - t0
    if not hasattr(model, "_compiled_call"):  # transformers' auto-compile did not engage: not this row
        raise RuntimeError("generate did not compile the forward (no _compiled_call)")
    one = statistics.median(gen(1) for _ in range(3))
    many = statistics.median(gen(new_tokens) for _ in range(3))
    ms = (many - one) / (new_tokens - 1) * 1e3
    results.setdefault("hf", []).append({"variant": "transformers dense, static cache + torch.compile (reduce-overhead)",
                                         "ms_per_token": ms, "ctx": ctx, "warmup_and_compile_s": compile_s,
                                         "transformers": transformers.__version__})
    log(f"HF dense static cache + torch.compile: {ms:.2f} ms/token (warm-up incl. compile {compile_s:.0f} s)")
    del model
    gc.collect()
    torch.cuda.empty_cache()


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in results["decode"] if r["batch"] == 1 and r["rank"] == 16 and r["ctx"] == results["ctx"]]
    labels = [r["variant"] for r in rows] + [r["variant"] for r in results.get("hf", [])]
    values = [r["ms_per_step"] for r in rows] + [r["ms_per_token"] for r in results.get("hf", [])]
    fig, ax = plt.subplots(figsize=(9, 5))
    ax.barh(labels, values, color=["#4c72b0" if "adafuse" in l else "#999999" for l in labels])
    ax.set_xscale("log")
    ax.set_xlabel("ms per decoded token (batch 1, context 512, Llama-2-7B shape, bf16, log scale)")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.1f}", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--hf", action="store_true", help="also time transformers + PEFT / mixlora")
    ap.add_argument("--quick", action="store_true", help="rank 16 and batch 1 only")
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--batches", default="1,8,32,64", help="batches of the per-rank table")
    ap.add_argument("--curve", default="2,4,16", help="extra batches of the r16 tokens/s curve (dense and fused)")
    ap.add_argument("--ctxs", default="2048,8192", help="extra contexts at batch 1 (dense and fused, r16)")
    ap.add_argument("--core", action="store_true", help="dense and fused rows only (no conventional/unmerged/switch)")
    ap.add_argument("--hf-compile", action="store_true", help="also time transformers with static cache + torch.compile")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--smoke", action="store_true", help="CPU dry run of every code path on a tiny shape (no kernels)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    global DEVICE
    config = None
    if args.smoke:
        DEVICE = "cpu"
        config = dict(LLAMA2_7B, vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4)
        args.ctx, args.steps = 16, 4
        from adafuse_export.runners.torch_cuda import TorchOps
        ops = TorchOps()
        torch_ops = None
        name = "cpu (smoke)"
    else:
        from adafuse_export.kernels.binding import load_kernels

        t = time.time()
        lib = load_kernels(archs=["90"])
        ops, torch_ops = KernelOps(lib), KernelOps(lib, step_kernels=False)
        name = torch.cuda.get_device_name()
        log(f"kernel library built/loaded in {time.time() - t:.1f} s on {name}")
    results = {"device": name, "torch": torch.__version__, "ctx": args.ctx,
               "steps": args.steps, "decode": [], "switch_kernel": []}
    results["tiny_correctness"] = check_tiny(ops)
    ints = lambda text: [int(v) for v in text.split(",") if v]
    ranks, batches = ([16], [1]) if args.quick else (ints(args.ranks), ints(args.batches))
    save = lambda: (args.out / "h200_decode.json").write_text(json.dumps(results, indent=2))
    bench_7b(ops, ranks, batches, args.ctx, args.steps, results, config, torch_ops=torch_ops, full=not args.core)
    save()  # each stage saved as it finishes: a later stage that runs out of time keeps the earlier rows
    if not args.quick and (ints(args.curve) or ints(args.ctxs)):
        bench_curve(ops, ints(args.curve), ints(args.ctxs), args.ctx, args.steps, results, config)
        save()
    for wanted, bench, key, what in ((args.hf_compile, bench_hf_compiled, "hf_compile_error", "transformers static cache + compile"),
                                     (args.hf, bench_hf, "hf_errors", "transformers baselines")):
        if wanted:
            try:
                bench(args.ctx, 16, results)
            except Exception as e:  # report, don't hide
                results[key] = f"{type(e).__name__}: {e}"
                log(f"{what} failed: {type(e).__name__}: {e}")
    plot(results, args.out / "h200_decode.png")
    # summary table
    log("\n| rank | batch | ctx | variant | ms/step | tokens/s | x dense | x floor |")
    log("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results["decode"]:
        dense = next(d["ms_per_step"] for d in results["decode"] if d["variant"] == "dense base"
                     and all(d[k] == r[k] for k in ("rank", "batch", "ctx")))
        r["x_dense"] = r["ms_per_step"] / dense
        log(f"| {r['rank']} | {r['batch']} | {r['ctx']} | {r['variant']} | {r['ms_per_step']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['x_dense']:.2f} | {r['ms_per_step'] / r['weight_read_floor_ms']:.2f} |")
    for r in results.get("hf", []):
        log(f"| 16 | 1 | {r['variant']} | {r['ms_per_token']:.1f} | | |")
    for r in results["switch_kernel"]:
        log(f"switch kernel r={r['rank']}: {r['ms']:.2f} ms, {r['GBps']:.0f} GB/s, {r['fraction_of_copy']:.0%} of copy")
    (args.out / "h200_decode.json").write_text(json.dumps(results, indent=2))
    ok = all(v["pass"] for v in results["tiny_correctness"].values())
    log("tiny-fixture correctness: " + ("PASS" if ok else "FAIL"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
