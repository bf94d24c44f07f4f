"""ONNX Runtime's CUDA execution provider on the H200: validation of the portable graph, and its
decode speed beside the native backend (the fused kernels), side by side in one run.

    python3 benchmarks/ort_gpu.py --out $OUT          # needs onnxruntime-gpu (CUDAExecutionProvider)

1. validate: every example kind (tiny models), portable graph, float32 and float16, run by
   OnnxRuntimeRunner with the CUDA provider against the PyTorch reference (float32 with
   use_tf32=0 and, to show why, use_tf32=1). bfloat16 graphs are reported as not run: the
   runner feeds numpy arrays and numpy has no bfloat16.
2. decode speed: a ~1.1B llama shape (random bf16 weights cast to fp16, 8 experts r16 top-2
   pre-gated on all seven projections), batch 1, prompt 128, median ms per decode step of
   a. ONNX Runtime CUDA EP, portable fp16 graph, IO binding (KV cache and routes stay on the GPU),
   b. the same session through OnnxRuntimeRunner (numpy in and out every step),
   c. the C++ runtime's native backend over its C API (runners/cpp_runtime.py; ADAFUSE_RUNTIME_LIB), fp16, fused
      kernels and CUDA graphs, with the adapters and without (the base alone).
Writes ort_gpu.json; prints a table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KINDS = ("pregate", "pregate-ffn", "mola", "loramoe", "mixlora", "lora")
MEDIUM = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5504,
          "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16, "rms_norm_eps": 1e-5,
          "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": False}


def log(*a):
    print(*a, flush=True)


def cuda_providers(tf32: bool):
    """`validate --device cuda`'s providers (TF32 off), or the CUDA provider's own TF32 default for comparison."""
    from adafuse_export.runners.onnxruntime import CUDA_PROVIDER

    return [("CUDAExecutionProvider", {"use_tf32": "1"}) if tf32 else CUDA_PROVIDER, "CPUExecutionProvider"]


def validate_kinds(work: Path) -> list[dict]:
    from adafuse_export.converters import load_checkpoint
    from adafuse_export.examples import make_example
    from adafuse_export.onnx.export import export_onnx
    from adafuse_export.runners.onnxruntime import OnnxRuntimeRunner
    from adafuse_export.validate import validate

    rows = []
    for kind in KINDS:
        ckpt_dir = work / f"ex-{kind}"
        make_example(ckpt_dir, kind=kind)
        ckpt = load_checkpoint(ckpt_dir)
        for dtype, tf32 in (("float32", False), ("float32", True), ("float16", False), ("bfloat16", False)):
            row = {"kind": kind, "dtype": dtype, "use_tf32": tf32}
            try:
                out = work / f"onnx-{kind}-{dtype}"
                if not out.exists():
                    export_onnx(ckpt, out, "portable", dtype)
                if dtype == "bfloat16":
                    raise NotImplementedError("OnnxRuntimeRunner feeds numpy arrays; numpy has no bfloat16")
                runner = (OnnxRuntimeRunner(out, providers=cuda_providers(True)) if tf32
                          else OnnxRuntimeRunner(out, device="cuda"))  # what `validate --device cuda` runs
                rep = validate(ckpt, out, steps=8, runner=runner)
                worst = max(rep["outputs"], key=lambda o: o["max_abs_diff"] / max(o["atol"], 1e-30))
                row.update(ran=True, provider=runner.provider, passed=rep["passed"],
                           logits_max_abs=next(o["max_abs_diff"] for o in rep["outputs"] if o["name"] == "logits"),
                           worst_output=worst["name"], worst_max_abs=worst["max_abs_diff"],
                           greedy=rep["greedy_agreement"]["fraction"], atol=rep["atol"])
            except Exception as e:  # one failing case must not hide the others
                row.update(ran=False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc(limit=3))
            rows.append(row)
            log(f"validate {kind:<12} {dtype:<9} tf32={int(tf32)}: " + (
                f"{'PASS' if row.get('passed') else 'FAIL'} on {row['provider']}, logits max abs {row['logits_max_abs']:.2e} "
                f"(atol {row['atol']:.0e}), greedy {row['greedy']:.0%}" if row.get("ran") else f"not run: {row.get('why') or row.get('error')}"))
    return rows


def median_ms(fn, steps: int, warmup: int = 3) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def decode_speed(work: Path, prompt_len: int, steps: int) -> dict:
    import onnxruntime as ort
    import torch

    from adafuse_export.converters import load_checkpoint
    from adafuse_export.onnx.export import export_onnx
    from adafuse_export.runners.onnxruntime import OnnxRuntimeRunner
    from benchmarks import synthetic_checkpoint

    synthetic_checkpoint.SHAPES["llama-1b"] = MEDIUM
    ckpt_dir, onnx_dir = work / "medium", work / "medium-onnx"
    t = time.time()
    synthetic_checkpoint.write_synthetic(ckpt_dir, "llama-1b", experts=8, rank=16, log=lambda s: None)
    ckpt = load_checkpoint(ckpt_dir)
    log(f"medium checkpoint written in {time.time() - t:.1f}s")
    t = time.time()
    export_onnx(ckpt, onnx_dir, "portable", "float16")
    log(f"portable fp16 export in {time.time() - t:.1f}s")
    out: dict = {"shape": MEDIUM, "experts": 8, "rank": 16, "top_k": 2, "prompt": prompt_len, "steps": steps}
    gen = np.random.default_rng(0)
    prompt = gen.integers(0, MEDIUM["vocab_size"], (1, prompt_len)).astype(np.int64)
    feed = gen.integers(0, MEDIUM["vocab_size"], steps + 8).tolist()

    # a. ORT CUDA EP with IO binding: everything stays on the device between steps.
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_dir / "decoder.onnx"), options, providers=cuda_providers(False))
    out["ort_provider"] = sess.get_providers()[0]
    from safetensors.torch import load_file

    table = load_file(str(onnx_dir / "routes.safetensors"))
    tab_ids, tab_gates = table["expert_ids"].cuda(), table["gates"].float().cuda()
    names_in = [i.name for i in sess.get_inputs()]
    names_out = [o.name for o in sess.get_outputs()]
    L, kv, hd = MEDIUM["num_hidden_layers"], MEDIUM["num_key_value_heads"], MEDIUM["hidden_size"] // MEDIUM["num_attention_heads"]
    state: dict = {}

    cache_len = prompt_len + steps + 16  # the decoder contract (onnx/contract.py): a cache that holds the whole run

    def bind_step(ids: torch.Tensor, past_len: int):
        b = sess.io_binding()
        s = ids.shape[1]
        past = torch.full((1,), past_len, device="cuda", dtype=torch.int64)
        lens = torch.full((1,), s, device="cuda", dtype=torch.int64)
        e, g = tab_ids[ids].contiguous(), tab_gates[ids].contiguous()
        keep = [ids, past, lens, e, g]
        for name, t_ in (("input_ids", ids), ("past_lengths", past), ("seq_lens", lens), ("expert_ids", e), ("gates", g)):
            if name in names_in:
                b.bind_input(name, "cuda", 0, {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32}[t_.dtype],
                             list(t_.shape), t_.data_ptr())
        for layer in range(L):
            for kind in ("key", "value"):
                name = f"past_key_values.{layer}.{kind}"
                if past_len == 0:
                    z = torch.zeros(1, kv, cache_len, hd, device="cuda", dtype=torch.float16)  # zeroed, as the contract wants
                    keep.append(z)
                    b.bind_input(name, "cuda", 0, np.float16, list(z.shape), z.data_ptr())
                else:
                    b.bind_ortvalue_input(name, state[f"present.{layer}.{kind}"])
        for name in names_out:
            b.bind_output(name, "cuda")
        sess.run_with_iobinding(b)
        outs = dict(zip(names_out, b.get_outputs()))
        state.update({n: v for n, v in outs.items() if n.startswith("present.")})
        return outs

    ids = torch.as_tensor(prompt, device="cuda")
    bind_step(ids, 0)
    pos = [prompt_len]
    it = iter(feed)

    def ort_step():
        tok = torch.full((1, 1), next(it), device="cuda", dtype=torch.int64)
        bind_step(tok, pos[0])
        pos[0] += 1
    out["ort_iobinding_ms"] = median_ms(ort_step, steps)
    del sess, state

    # b. the runner validate uses (numpy every step)
    runner = OnnxRuntimeRunner(onnx_dir, providers=cuda_providers(False))
    runner.prefill(prompt)
    it2 = iter(feed)
    out["ort_runner_numpy_ms"] = median_ms(lambda: runner.decode(np.array([[next(it2)]], np.int64)), steps)
    del runner

    # c. the native backend over the C API (the one GPU decode path), with and without the adapters
    from adafuse_export import native_artifact
        from adafuse_export.runners.cpp_runtime import open_native

    for key, model in (("native_fused_ms", ckpt), ("native_dense_ms", ckpt.base_only())):
        art = work / f"{key}.native"
        art.mkdir()
        native_artifact.write_artifact(model, art, "float16", max_batch=1, max_seq=prompt_len + steps + 16)
        with open_native(art, "fused") as engine:
            engine.prefill(prompt)
            it3 = iter(feed)
            out[key] = median_ms(lambda: engine.decode(np.array([next(it3)])), steps)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    import onnxruntime as ort
    import torch

    result: dict = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
                    "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    log(f"onnxruntime {ort.__version__}: {result['providers']} on {result['device']}")
    if "CUDAExecutionProvider" not in result["providers"]:
        log("CUDAExecutionProvider is not available: nothing to measure")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result["validate"] = validate_kinds(work)
        if not args.skip_speed:
            try:
                result["decode"] = decode_speed(work, args.prompt, args.steps)
            except Exception as e:
                result["decode_error"] = f"{type(e).__name__}: {e}"
                log(traceback.format_exc())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ort_gpu.json").write_text(json.dumps(result, indent=2))
    d = result.get("decode")
    if d:
        log("\n| variant (1.1B llama shape, fp16, 8 experts r16 top-2, batch 1) | ms/step | x native fused |")
        log("| --- | --- | --- |")
        base = d["native_fused_ms"]
        for key, label in (("native_dense_ms", "native backend, base model (no adapters)"),
                           ("native_fused_ms", "native backend, AdaFuse fused kernels, CUDA graphs"),
                           ("ort_iobinding_ms", "ONNX Runtime CUDA EP, portable graph, IO binding"),
                           ("ort_runner_numpy_ms", "ONNX Runtime CUDA EP through OnnxRuntimeRunner (numpy)")):
            log(f"| {label} | {d[key]:.2f} | {d[key] / base:.2f} |")
    ran = [r for r in result["validate"] if r.get("ran") and not r["use_tf32"]]
    ok = bool(ran) and all(r["passed"] and r["provider"] == "CUDAExecutionProvider" for r in ran)
    log(f"validate with CUDAExecutionProvider (use_tf32=0): {sum(r['passed'] for r in ran)}/{len(ran)} passed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
