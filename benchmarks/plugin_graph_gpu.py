#!/usr/bin/env python3
"""The plugin-flavour ONNX graph (the graph TensorRT is given) run by ONNX Runtime with the adafuse
nodes executed by the plugins' CUDA kernels, for every example kind and dtype, against the reference.

    PYTHONPATH=$PWD python3 benchmarks/plugin_graph_gpu.py OUT.json [--impl cuda|cpu] [--kinds ...] [--dtypes ...]

On the H200 (nothing downloads there: bring onnxruntime-extensions as a wheel in the ignored .whl/):
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ortx \
        .whl/onnxruntime_extensions-0.15.2-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl
    PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/ortx python3 benchmarks/plugin_graph_gpu.py $OUT/plugin_graph_gpu.json

Per (kind, dtype), two checks, each recorded with what ran or why it could not:
  graph  `validate` of the whole plugin export: ONNX Runtime (CPU provider) runs the standard ops, the
         adafuse nodes run as custom ops with --impl (cuda: Kernels.lora_linear, the plugins' kernels);
         per-output diffs, greedy and routing agreement against the PyTorch reference in that dtype.
         bfloat16 cannot run: ONNX Runtime's CPU provider has no bfloat16 kernels for the standard ops
         around the adafuse nodes (the session refuses to load; its message is recorded).
  nodes  every adafuse node of the export, with its own fields and weights (bfloat16 included), in a
         one-node graph through the same ONNX Runtime custom op (x fed as float32 and Cast to the
         node's dtype in-graph, since numpy has no bfloat16), on fresh random tokens and routes,
         against a float64 torch formula; once with --impl and once with the CPU implementation.
One failing case is recorded and the others still run. Prints a table; writes OUT.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from adafuse_export.errors import AdafuseError  # noqa: E402
from adafuse_export.examples import KINDS, make_example  # noqa: E402

DTYPES = ("float32", "float16", "bfloat16")
PROMPTS = [[3, 17, 250, 4, 99, 0, 255, 42], [7, 7, 7, 1]]
NODE_ROWS = 7
# max |y - y64| / max |y64| allowed per dtype: float32 accumulation, plus one output rounding (2^-11, 2^-8)
NODE_TOL = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2}


def error_text(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"[:600]


def check_graph(ckpt, export: Path, impl: str, steps: int) -> dict:
    """validate the plugin export; the portable export's greedy agreement beside it says which
    disagreements come from the dtype (near-tied logits) rather than from the adafuse nodes."""
    from adafuse_export.onnx.export import export_onnx
    from adafuse_export.runners.onnxruntime import OnnxRuntimeRunner
    from adafuse_export.validate import validate

    t0 = time.time()
    try:
        runner = OnnxRuntimeRunner(export, plugin_ops=impl)
    except AdafuseError as e:  # recorded: e.g. no bfloat16 kernels in ONNX Runtime's CPU provider
        if "ONNX Runtime cannot load this model" not in str(e):
            raise
        return {"ran": False, "reason": error_text(e)}
    report = validate(ckpt, export, PROMPTS, steps=steps, runner=runner)
    portable = export.with_name(export.name + "-portable")
    export_onnx(ckpt, portable, "portable", runner.meta["adafuse.dtype"])
    portable_greedy = validate(ckpt, portable, PROMPTS, steps=steps)["greedy_agreement"]
    by_name = {o["name"]: o for o in report["outputs"]}
    ids = by_name.get("expert_ids")
    return {"ran": True, "passed": report["passed"], "runner": report["runner_description"],
            "greedy": report["greedy_agreement"], "portable_greedy": portable_greedy, "atol": report["atol"], "rtol": report["rtol"],
            "logits_max_abs_diff": by_name["logits"]["max_abs_diff"],
            "routing_mismatched": None if ids is None else f"{ids['mismatched']}/{ids['elements']}",
            "failed_outputs": [o["name"] for o in report["outputs"] if not o["passed"]],
            "plugin_nodes": runner.plugin.nodes if runner.plugin else 0, "seconds": round(time.time() - t0, 2)}


def _one_node_model(model, node, inits: dict):
    """The node with its weight initializers; x, expert_ids, gates become inputs (x float32, Cast in-graph)."""
    from onnx import TensorProto, helper

    from adafuse_export.onnx import plugin_ops

    weights = [node.input[p] for p in (plugin_ops.W, plugin_ops.A, plugin_ops.B, plugin_ops.BIAS) if p < len(node.input)]
    elem = inits[node.input[plugin_ops.W]].data_type
    copy = helper.make_node(node.op_type, ["x", *node.input[1:4], "ids", "gates", *node.input[6:]], ["y"],
                            name=node.name, domain=node.domain)
    copy.attribute.extend(node.attribute)
    nodes = [helper.make_node("Cast", ["x_f32"], ["x"], to=elem), copy, helper.make_node("Cast", ["y"], ["y_f32"], to=TensorProto.FLOAT)]
    inputs = [helper.make_tensor_value_info("x_f32", TensorProto.FLOAT, None),
              helper.make_tensor_value_info("ids", TensorProto.INT32, None),
              helper.make_tensor_value_info("gates", TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, "one_node", inputs, [helper.make_tensor_value_info("y_f32", TensorProto.FLOAT, None)],
                              initializer=[inits[w] for w in weights])
    one = helper.make_model(graph, opset_imports=list(model.opset_import))
    one.ir_version = model.ir_version  # the export's IR version (onnx's default may be newer than the runtime reads)
    return one, weights


def float64_torch(x, W, A, B, ids, gates, bias, scale):
    """y = x W^T + bias + scale * sum_j g_j B[e_j] (A[e_j] x), in float64 with torch (independent of both ops)."""
    import torch

    t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64))  # noqa: E731
    x, W, A, B, gates = t(x), t(W), t(A), t(B), t(gates)
    ids = torch.as_tensor(ids.astype(np.int64))
    y = x @ W.T + (t(bias) if bias is not None else 0)
    for j in range(ids.shape[1]):
        y = y + scale * gates[:, j:j + 1] * torch.bmm(B[ids[:, j]], torch.bmm(A[ids[:, j]], x[:, :, None]))[:, :, 0]
    return y.numpy()


def check_nodes(export: Path, impl: str, dtype: str, seed: int) -> dict:
    import ml_dtypes
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from adafuse_export.onnx import plugin_ops
    from adafuse_export.runners.plugin_ops_ort import PluginGraph

    model = onnx.load(str(export / "decoder.onnx"))
    nodes = [n for n in model.graph.node if n.domain == plugin_ops.DOMAIN]
    inits = {t.name: t for t in model.graph.initializer}
    if not nodes:
        return {"ran": False, "reason": "no adafuse nodes in this export (static LoRA is merged into W at export)"}
    np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
    rng = np.random.default_rng(seed)
    worst: dict[str, float] = {}
    failures: list[str] = []
    for node in nodes:
        fields = plugin_ops.node_fields(node)
        one, weights = _one_node_model(model, node, inits)
        values = {w: numpy_helper.to_array(inits[w]).astype(np.float64) for w in weights}
        x = rng.standard_normal((NODE_ROWS, fields["in_features"])).astype(np_dtype).astype(np.float32)
        ids = np.stack([rng.permutation(fields["num_experts"])[:fields["top_k"]] for _ in range(NODE_ROWS)]).astype(np.int32)
        gates = rng.uniform(0.1, 1.0, (NODE_ROWS, fields["top_k"])).astype(np.float32)
        W, A, B = (values[node.input[p]] for p in (plugin_ops.W, plugin_ops.A, plugin_ops.B))
        bias = values[node.input[plugin_ops.BIAS]] if fields["has_bias"] else None
        want = float64_torch(x, W, A, B, ids, gates, bias, float(np.float32(fields["scale"])))
        for name in dict.fromkeys((impl, "cpu")):
            try:
                plugin = PluginGraph(one, export / "decoder.onnx", name)
                options = ort.SessionOptions()
                options.log_severity_level = 3
                session = ort.InferenceSession(plugin.session_source(options), options, providers=["CPUExecutionProvider"])
                y = plugin.run(session, ["y_f32"], {"x_f32": x, "ids": ids, "gates": gates})[0]
                err = float(np.abs(y - want).max() / max(np.abs(want).max(), 1e-30))
                if not np.isfinite(y).all():
                    err = float("nan")
                worst[name] = err if not (err <= worst.get(name, 0.0)) else worst[name]
            except Exception as e:  # noqa: BLE001 - recorded per node, the others still run
                failures.append(f"{name} {node.name}: {error_text(e)}")
    passed = not failures and all(v <= NODE_TOL[dtype] for v in worst.values())
    return {"ran": True, "passed": passed, "nodes": len(nodes), "rows": NODE_ROWS,
            "max_rel_err": worst, "tolerance": NODE_TOL[dtype], "failures": failures[:8]}


def environment() -> dict:
    env: dict = {"python": platform.python_version()}
    for mod in ("torch", "onnx", "onnxruntime", "onnxruntime_extensions", "numpy", "ml_dtypes"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            env[mod] = f"unavailable ({error_text(e)})"
    try:
        import torch

        env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception as e:  # noqa: BLE001
        env["gpu"] = f"unavailable ({error_text(e)})"
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="JSON file to write")
    p.add_argument("--impl", choices=["cuda", "cpu"], default="cuda", help="custom-op implementation under test")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--steps", type=int, default=8, help="greedy decode steps after the prefill")
    args = p.parse_args(argv)

    from adafuse_export.converters import load_checkpoint
    from adafuse_export.onnx.export import export_onnx

    results = {"command": " ".join(sys.argv), "impl": args.impl, "environment": environment(), "cases": []}
    print(json.dumps(results["environment"]), flush=True)
    root = Path(tempfile.mkdtemp(prefix="plugin_graph_gpu."))
    for seed, kind in enumerate(KINDS):
        if kind not in args.kinds:
            continue
        make_example(root / kind, kind, seed=seed)  # the seeds of tests/conftest.py
        ckpt = load_checkpoint(root / kind)
        for dtype in args.dtypes:
            case: dict = {"kind": kind, "dtype": dtype}
            export = root / f"{kind}-{dtype}"
            try:
                export_onnx(ckpt, export, "plugin", dtype)
                case["graph"] = check_graph(ckpt, export, args.impl, args.steps)
                case["nodes"] = check_nodes(export, args.impl, dtype, seed)
            except Exception as e:  # noqa: BLE001 - one failing case must not stop the others
                case["error"] = error_text(e)
                case["traceback"] = traceback.format_exc()[-2000:]
            results["cases"].append(case)
            print(row(case, args.impl), flush=True)
    results["all_passed"] = all(case_passed(c) for c in results["cases"])
    results["not_run"] = [f"{c['kind']} {c['dtype']} {k}: {c[k]['reason']}" for c in results["cases"] if "error" not in c
                          for k in ("graph", "nodes") if not c[k]["ran"]]
    print("\nnot run (and why):" if results["not_run"] else "", *results["not_run"], sep="\n  ")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}; all runnable checks passed: {results['all_passed']}")
    return 0 if results["all_passed"] else 1


def case_passed(c: dict) -> bool:
    """Nothing errored, every check that ran passed, and the graph ran unless it is bfloat16 (which
    ONNX Runtime's CPU provider cannot load)."""
    if "error" in c or (not c["graph"]["ran"] and c["dtype"] != "bfloat16"):
        return False
    return all(c[k]["passed"] for k in ("graph", "nodes") if c[k]["ran"])


def row(c: dict, impl: str) -> str:
    head = f"{c['kind']:<12} {c['dtype']:<9}"
    if "error" in c:
        return f"{head} ERROR {c['error']}"
    g, n = c["graph"], c["nodes"]
    if g["ran"]:
        greedy = g["greedy"]
        portable = g["portable_greedy"]
        graph = (f"graph {'PASS' if g['passed'] else 'FAIL'} logits {g['logits_max_abs_diff']:.2e} greedy "
                 f"{greedy['matched']}/{greedy['total']} (portable graph {portable['matched']}/{portable['total']}) "
                 f"routing mismatches {g['routing_mismatched'] or '-'} ({g['plugin_nodes']} nodes, {g['seconds']}s)")
    else:
        graph = f"graph NOT RUN (...{g['reason'][-100:]})"
    if n["ran"]:
        errs = " ".join(f"{k} {v:.1e}" for k, v in n["max_rel_err"].items())
        nodes = f"nodes {'PASS' if n['passed'] else 'FAIL'} {n['nodes']}x rel err {errs} (tol {n['tolerance']:.0e})"
        nodes += f" failures: {n['failures'][0]}" if n["failures"] else ""
    else:
        nodes = f"nodes NOT RUN ({n['reason']})"
    return f"{head} {graph} | {nodes}"


if __name__ == "__main__":
    sys.exit(main())
