"""validate: run the PyTorch reference and a runner on the same prompts and compare every output.

Prefill, then N greedy decode steps. The runner is fed the reference's tokens, so one
early difference does not compound; greedy agreement (does the runner's argmax equal the
reference's?) is reported besides. Per output (logits, each present key/value, expert ids,
gates): max abs diff, max rel diff, tolerance, pass/fail, like Optimum's export check and
Polygraphy's comparator. Element passes when |runner - ref| <= atol + rtol * |ref|;
expert ids must match exactly.

Half precision (HALF_TOLERANCE_MODES): a float16/bfloat16 model is judged against the float32
reference, the truth, and each output's atol at each step is max(atol, 2 x the same-dtype
reference's own max abs distance from float32 there): two half computations are each about that far
from float32 in different directions, so a fixed atol between them measures the reference's rounding,
not the model's. Routing (expert ids, gates) is decided in float32 from dtype-rounded weights: it
stays compared with the same-dtype reference, ids exactly.

FP8 weights (a native artifact whose manifest says model.weights fp8_e4m3, or an ONNX export whose metadata says
adafuse.weights fp8_e4m3): the references are the model's FP8 twin (fp8_twin.load_fp8_twin: the projection weights
the model's e4m3 ones dequantized), so the runtime is judged by the bounds above against what it was given. The quantization's own effect is reported besides
(quantization_effect: the twin against the unquantized reference, both run here), information unless
min_greedy_agreement asks for a floor.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from .checkpoint import Checkpoint
from .errors import AdafuseError
from .runners.base import ModelInfo
from .summary import adapter_summary, routing_metadata

# (atol, rtol) per model dtype
TOLERANCES = {"float32": (1e-4, 1e-3), "float16": (2e-2, 2e-2), "bfloat16": (1.5e-1, 5e-2)}
DEFAULT_PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]
DEFAULT_STEPS = 8  # `validate --steps`
HALF_DTYPES = ("float16", "bfloat16")
HALF_BOUND_MULTIPLE = 2.0  # docs/large-models.md "Float16 error": the 7B graph is 0.41-0.72x the reference's error
HALF_TOLERANCE_MODES = {  # mode -> (description, the few words convert's summary prints)
    "measured": ("judged against the float32 reference; each output's atol is max(atol, 2 x the {dtype} reference's "
                 "own max abs distance from float32 at that step); expert ids exact and gates against the {dtype} "
                 "reference (routing is decided from {dtype} weights)",
                 "{dtype} judged against float32, atol max(fixed, 2 x the {dtype} reference's distance)"),
    "fixed": ("judged against the {dtype} reference with the fixed tolerance",
              "{dtype} against the {dtype} reference, fixed tolerance"),
}


REL_FLOOR = 0.01  # the relative error is taken where |reference| >= this share of the step's largest |reference|


class _Stat:
    def __init__(self, name: str, atol: float, rtol: float):
        self.name, self.atol, self.rtol = name, atol, rtol
        self.max_abs = self.max_rel = 0.0
        self.mismatched = self.elements = 0
        self.top1_matched = self.top1_total = 0  # logits: positions whose largest logit is the reference's
        self.worst_step: str | None = None
        self.shape_error: str | None = None
        self.half_max_abs: float | None = None  # the same-dtype reference's distance from `want` (measured bound)
        self.atol_applied = atol

    def add(self, got, want, step: str, half=None):
        """half: the same-dtype reference's output when `want` is the float32 reference: atol widens to
        HALF_BOUND_MULTIPLE times its distance from `want` when that is larger."""
        if got is None or want is None:
            if (got is None) != (want is None):
                self.shape_error = f"{'runner' if got is None else 'reference'} has no '{self.name}' at {step}"
            return
        got, want = np.asarray(got), np.asarray(want)
        if got.shape != want.shape:
            self.shape_error = f"shape {list(got.shape)} from the runner, {list(want.shape)} from the reference at {step}"
            return
        g, w = got.astype(np.float64), want.astype(np.float64)
        atol = self.atol
        # a non-finite reference judges nothing (inf - inf is NaN, |x - inf| <= inf holds): a failure with its reason
        if not np.isfinite(w).all():
            self.shape_error = self.shape_error or f"the reference's '{self.name}' is not finite at {step}"
            return
        if half is not None and np.shape(half) == w.shape and w.size:
            h = np.asarray(half, np.float64)
            if not np.isfinite(h).all():  # e.g. a float32-finite weight overflowing float16: no bound is measured
                self.shape_error = self.shape_error or (
                    f"the half-precision reference's '{self.name}' is not finite at {step} (it overflows that dtype), "
                    "so no bound can be measured from it")
                return
            measured = float(np.max(np.abs(h - w)))
            self.half_max_abs = max(self.half_max_abs or 0.0, measured)
            atol = max(atol, HALF_BOUND_MULTIPLE * measured)
            self.atol_applied = max(self.atol_applied, atol)
        diff = np.abs(g - w)
        ok = diff <= atol + self.rtol * np.abs(w)
        # relative error where the reference is not near zero (a logit of 1e-6 off by 2e-3 is no error of 2000x)
        floor = max(atol, REL_FLOOR * float(np.max(np.abs(w)))) if w.size else 0.0
        big = np.abs(w) >= floor
        rel = diff[big] / np.abs(w[big]) if floor > 0 else diff / np.maximum(np.abs(w), 1e-6)
        if self.name == "logits" and w.ndim >= 1 and w.shape[-1] > 1 and np.isfinite(g).all():
            self.top1_matched += int((np.argmax(g, -1) == np.argmax(w, -1)).sum())
            self.top1_total += int(np.prod(w.shape[:-1]))
        m_abs = float(np.max(diff)) if diff.size else 0.0
        if not np.isfinite(g).all():
            m_abs = float("nan")
        if self.worst_step is None or not (m_abs <= self.max_abs):
            self.worst_step = step
        self.max_abs = m_abs if not (m_abs <= self.max_abs) else self.max_abs
        self.max_rel = max(self.max_rel, float(np.max(rel)) if rel.size else 0.0)
        self.mismatched += int((~ok).sum())
        self.elements += int(ok.size)

    def report(self) -> dict:
        passed = self.shape_error is None and self.mismatched == 0 and self.max_abs == self.max_abs
        bound = ("exact" if self.atol == 0 and self.rtol == 0 else
                 "measured" if self.atol_applied > self.atol else "fixed")
        return {"name": self.name, "max_abs_diff": self.max_abs, "max_rel_diff": self.max_rel, "atol": self.atol,
                "rtol": self.rtol, "bound": bound, "atol_applied": self.atol_applied,
                "half_reference_max_abs": self.half_max_abs, "mismatched": self.mismatched, "elements": self.elements,
                "worst_step": self.worst_step, "error": self.shape_error, "passed": passed,
                **({"top1": {"matched": self.top1_matched, "total": self.top1_total}} if self.top1_total else {})}


def check_compatible(ckpt: Checkpoint, info: ModelInfo) -> list[str]:
    """Raise AdafuseError when the model's inputs/outputs or recorded config do not fit the checkpoint.

    Returns notes (e.g. a different checkpoint hash with the same structure)."""
    m, a = ckpt.model, ckpt.adapter
    where = f"{info.model}: model does not match checkpoint {ckpt.path}"

    def bad(what, model_value, ckpt_value):
        raise AdafuseError(f"{where}: {what} is {model_value} in the model, {ckpt_value} in the checkpoint")

    if info.num_layers != m.num_layers:
        bad("the number of layers (past_key_values inputs)", info.num_layers, m.num_layers)
    if info.vocab_size != m.vocab_size:
        bad("the vocabulary size (logits)", info.vocab_size, m.vocab_size)
    if info.kv_heads != m.num_kv_heads:
        bad("the number of KV heads", info.kv_heads, m.num_kv_heads)
    if info.head_dim != m.head_dim:
        bad("head_dim", info.head_dim, m.head_dim)
    wants_routes = a.routing_table_exact
    if info.needs_routes != wants_routes:
        bad("'expert_ids'/'gates' decoder inputs", "present" if info.needs_routes else "absent",
            f"{'needed' if wants_routes else 'not needed'} (routing '{a.routing}')")
    meta = info.meta
    expected = {**routing_metadata(adapter_summary(a)), "adafuse.hidden_size": str(m.hidden_size)}
    notes = []
    if "adafuse.format" not in meta:
        notes.append("the model carries no adafuse metadata; only its inputs and outputs were checked against the checkpoint")
        return notes
    for key, value in expected.items():
        if key in meta and meta[key] != value:
            bad(key.split(".", 1)[1], meta[key], value)
    if meta.get("adafuse.dtype", info.dtype) != info.dtype:
        notes.append(f"the model's metadata says adafuse.dtype={meta['adafuse.dtype']}, its tensors are {info.dtype}: "
                     f"judged as {info.dtype}")
    if meta.get("adafuse.checkpoint_sha256") not in (None, ckpt.index_sha256()):
        notes.append("the model was exported from a checkpoint with a different tensor index hash (same structure)")
    return notes


METHODS = {
    "full": "the reference holds every weight in memory",
    "layerwise": "the reference reads one layer's weights at a time (streamed from the checkpoint on every step); "
                 "ONNX Runtime runs per-layer subgraphs cut from the exported graph, one at a time, hidden states "
                 "carried between them, weights read from the memory-mapped data file (no optimised copies)",
}


def open_model_runner(model: Path, mode: str = "full", **options):
    """The runner for MODEL under validation `mode`; layerwise: ONNX Runtime too runs one layer at a time,
    its weights in the memory-mapped data file instead of optimised copies."""
    from .runners import open_runner

    if mode == "layerwise" and Path(model).suffix != ".engine":
        options["layerwise"] = True
    return open_runner(model, **options)


def validate(ckpt: Checkpoint, model: Path, prompts: list[list[int]] | None = None, steps: int = DEFAULT_STEPS,
             atol: float | None = None, rtol: float | None = None, runner=None, mode: str = "full",
             log: Callable[[str], object] | None = None, half_tolerance: str = "measured",
             min_greedy_agreement: float | None = None) -> dict:
    """mode: how the reference holds its weights (METHODS); the comparison and tolerances are the same.
    half_tolerance: how a float16/bfloat16 model is judged (HALF_TOLERANCE_MODES).
    min_greedy_agreement: FP8 weights only: fail when the quantization's greedy agreement is below this fraction.
    log: told how it validates, then after each compared step (a 7B step takes minutes on a CPU)."""
    # a broken model's inf/NaN are judged in the report; numpy's RuntimeWarnings would only add stderr noise
    with np.errstate(all="ignore"):
        return _validate(ckpt, model, prompts, steps, atol, rtol, runner, mode, log, half_tolerance,
                         min_greedy_agreement)


def quantization_effect(ckpt: Checkpoint, artifact: Path, prompts: list[list[int]], steps: int,
                        dtype: str = "float32", stream: bool = False) -> dict:
    """The FP8 weights' own effect, no runtime involved: the artifact's FP8 twin against the unquantized reference
    (both `dtype`), both fed the unquantized reference's greedy tokens (one early flip does not compound). max |diff|
    of the logits over every position, and greedy agreement: positions whose argmax is the same, every position of
    each prompt (each predicts the next token) and each decode step."""
    from .fp8_twin import load_fp8_twin
    from .runners.reference import ReferenceRunner

    plain, twin = ReferenceRunner(ckpt, dtype, stream=stream), ReferenceRunner(ckpt, dtype, stream=stream)
    if not load_fp8_twin(twin.model, artifact):
        raise AdafuseError(f"{artifact}: its weights are not FP8 (manifest model.weights, ONNX metadata adafuse.weights), "
                           "no quantization to measure")
    max_abs, agree, total = 0.0, 0, 0
    for prompt in prompts:
        ids = np.asarray([prompt], dtype=np.int64)
        want, got = plain.step_logits(ids, True), twin.step_logits(ids, True)
        for step in range(steps + 1):
            w, g = want.double(), got.double()
            d = float((w - g).abs().max())
            max_abs = d if not d <= max_abs else max_abs  # NaN sticks
            same = w.argmax(-1) == g.argmax(-1)
            agree, total = agree + int(same.sum()), total + same.numel()
            if step == steps:
                break
            tok = want[:, -1].argmax(-1)[:, None].numpy()
            want, got = plain.step_logits(tok, False), twin.step_logits(tok, False)
    return {"weights": "fp8_e4m3", "dtype": dtype, "reference": plain.info.description,
            "description": f"the FP8 twin against the unquantized reference ({dtype}), fed the latter's greedy tokens; "
                           "every prompt position and decode step",
            "max_abs_diff": max_abs,
            "greedy_agreement": {"matched": agree, "total": total, "fraction": agree / total if total else 1.0}}


def _validate(ckpt: Checkpoint, model: Path, prompts: list[list[int]] | None, steps: int, atol: float | None,
              rtol: float | None, runner, mode: str, log: Callable[[str], object] | None, half_tolerance: str,
              min_greedy_agreement: float | None = None) -> dict:
    from .runners.reference import ReferenceRunner

    ckpt.require_exportable()  # nothing exported can stand for it
    prompts = prompts or [[t % ckpt.model.vocab_size for t in DEFAULT_PROMPT]]
    for p in prompts:
        bad = [t for t in p if not 0 <= t < ckpt.model.vocab_size]
        if bad:
            raise AdafuseError(f"--prompt-ids: token id {bad[0]} is out of the vocabulary [0, {ckpt.model.vocab_size}) of {ckpt.path}")
    if runner is None:
        runner = open_model_runner(model, mode)
    notes = check_compatible(ckpt, runner.info)
    dtype = runner.info.dtype
    d_atol, d_rtol = TOLERANCES.get(dtype, TOLERANCES["float32"])
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    if mode not in METHODS:
        raise ValueError(f"validation mode {mode!r}, expected one of {', '.join(METHODS)}")
    if half_tolerance not in HALF_TOLERANCE_MODES:
        raise ValueError(f"half tolerance {half_tolerance!r}, expected one of {', '.join(HALF_TOLERANCE_MODES)}")
    stream = mode == "layerwise"
    measured = dtype in HALF_DTYPES and half_tolerance == "measured"
    # the truth: float32 when the bound is measured; the same-dtype reference then decides routing and the bound
    reference = ReferenceRunner(ckpt, dtype="float32" if measured else dtype, stream=stream)
    same = ReferenceRunner(ckpt, dtype=dtype, stream=stream) if measured else None
    quantization = None
    if runner.info.meta.get("adafuse.weights") == "fp8_e4m3":
        from .fp8_twin import load_fp8_twin

        artifact = Path(runner.info.model)  # the native artifact, or the decoder .onnx
        for r in (reference, same):
            if r is not None:
                load_fp8_twin(r.model, artifact)
                r.info = replace(r.info, description=r.info.description
                                 + ", FP8 twin (the model's FP8 projection weights dequantized)")
        if log is not None:
            log("FP8 weights: judged against the FP8 twin; measuring the quantization against the unquantized reference")
        quantization = quantization_effect(ckpt, artifact, prompts, steps, reference.info.dtype, stream)
        if min_greedy_agreement is not None:
            quantization["min_greedy_agreement"] = min_greedy_agreement
            quantization["passed"] = quantization["greedy_agreement"]["fraction"] >= min_greedy_agreement
    tolerance = None
    if dtype in HALF_DTYPES:
        tolerance = {"half": half_tolerance, "multiple": HALF_BOUND_MULTIPLE if measured else None,
                     "description": HALF_TOLERANCE_MODES[half_tolerance][0].format(dtype=dtype),
                     "summary": HALF_TOLERANCE_MODES[half_tolerance][1].format(dtype=dtype)}
        if log is not None:
            log(f"{dtype} model {tolerance['description']}" + (
                f"; two references run ({'both streamed: about twice the time of one' if stream else 'both in memory'})"
                if measured else ""))
    stats: dict[str, _Stat] = {}

    def stat(name, exact=False):
        if name not in stats:
            stats[name] = _Stat(name, 0.0 if exact else atol, 0.0 if exact else rtol)
        return stats[name]

    agree = total = 0
    started = time.monotonic()
    for pi, prompt in enumerate(prompts):
        ids = np.asarray([prompt], dtype=np.int64)
        ref, got = reference.prefill(ids), runner.prefill(ids)
        half = same.prefill(ids) if same is not None else None
        for step in range(steps + 1):
            label = f"prompt {pi} " + ("prefill" if step == 0 else f"decode {step}")
            stat("logits").add(got.logits, ref.logits, label, None if half is None else half.logits)
            for name in ref.present:
                stat(name).add(got.present.get(name), ref.present[name], label,
                               None if half is None else half.present.get(name))
            routes = ref if half is None else half
            if routes.expert_ids is not None or got.expert_ids is not None:
                stat("expert_ids", exact=True).add(got.expert_ids, routes.expert_ids, label)
                stat("gates").add(got.gates, routes.gates, label)
            nxt = ref.logits[:, -1].argmax(-1)
            agree += int((got.logits[:, -1].argmax(-1) == nxt).sum())
            total += nxt.size
            if log is not None:
                log(f"{label} compared ({step + 1}/{steps + 1}, {time.monotonic() - started:.0f} s)")
            if step == steps:
                break
            tok = nxt[:, None].astype(np.int64)
            ref, got = reference.decode(tok), runner.decode(tok)
            half = same.decode(tok) if same is not None else None
    outputs = [s.report() for s in stats.values()]
    return {
        "checkpoint": str(ckpt.path), "model": str(runner.info.model), "runner": runner.name,
        "runner_description": runner.info.description, "reference": reference.info.description, "dtype": dtype,
        "routing_reference": (same or reference).info.description, "tolerance": tolerance,
        "method": {"mode": mode, "description": METHODS[mode]},
        "prompts": prompts, "decode_steps": steps, "atol": atol, "rtol": rtol, "outputs": outputs,
        "greedy_agreement": {"matched": agree, "total": total, "fraction": agree / total if total else 1.0},
        "quantization": quantization, "notes": notes,
        "passed": all(o["passed"] for o in outputs) and (quantization or {}).get("passed", True),
    }


def summary(report: dict) -> list[str]:
    """A few lines for `convert`: verdict, logits/routes against their tolerance, the KV cache in one line,
    greedy and routing agreement (the full table: adafuse-export validate)."""
    outs = report["outputs"]
    half = f"; {report['tolerance']['summary']}" if report.get("tolerance") else ""
    lines = [f"{'PASSED' if report['passed'] else 'FAILED'} ({report['method']['mode'] if 'method' in report else 'full'} "
             f"validation, {report['runner_description']}{half})"]
    for o in outs:
        if o["name"] in ("logits", "expert_ids", "gates"):
            lines.append(f"{o['name']}: max abs diff {o['max_abs_diff']:.3e}, tolerance {tolerance_text(o)}"
                         f"{_half_distance(o)}; {_out_of_tolerance(o)}; relative error {o['max_rel_diff']:.1e} "
                         f"(where |reference| >= 1% of its largest)" + _top1(o)
                         + ("" if o["passed"] else " FAIL" + (f" ({o['error']})" if o["error"] else "")))
    kv = [o for o in outs if o["name"].startswith("present.")]
    if kv:
        worst = max(kv, key=lambda o: o["max_abs_diff"])
        failed = [o["name"] for o in kv if not o["passed"]]
        widened = sum(o.get("bound") == "measured" for o in kv)
        lines.append(f"KV cache: {len(kv)} tensors, {len(kv) - len(failed)} pass; largest diff {worst['max_abs_diff']:.3e} "
                     f"({worst['name']})" + (f"; {widened} under a measured bound" if widened else "")
                     + (f"; failing: {_names(failed)}" if failed else ""))
    g = report["greedy_agreement"]
    lines.append(f"greedy agreement {g['matched']}/{g['total']}")
    routes = next((o for o in outs if o["name"] == "expert_ids"), None)
    if routes is not None:
        lines.append(f"routing agreement {routes['elements'] - routes['mismatched']}/{routes['elements']} expert ids")
    lines += quantization_lines(report)
    return lines


def quantization_lines(report: dict) -> list[str]:
    """The FP8 quantization's own effect (validate's report['quantization']), in one line; none for other models."""
    q = report.get("quantization")
    if not q:
        return []
    g = q["greedy_agreement"]
    floor = q.get("min_greedy_agreement")
    verdict = "" if floor is None else (f"; at least {100 * floor:.1f}% asked: "
                                         + ("PASS" if q["passed"] else "FAIL"))
    return [f"FP8 quantization ({q['description']}): logits max abs diff {q['max_abs_diff']:.3e}, greedy agreement "
            f"{g['matched']}/{g['total']} ({100 * g['fraction']:.1f}%){verdict}"]


def tolerance_text(o: dict) -> str:
    """The bound an output was judged by: exact, the fixed atol, or the atol measured from the half reference."""
    if o["atol"] == 0 and o["rtol"] == 0:
        return "exact"
    if o.get("bound") == "measured":
        return f"measured atol {o['atol_applied']:.1e} rtol {o['rtol']:.0e}"
    return ("fixed " if o.get("half_reference_max_abs") is not None else "") + f"atol {o['atol']:.0e} rtol {o['rtol']:.0e}"


def _out_of_tolerance(o: dict) -> str:
    share = 100 * o["mismatched"] / o["elements"] if o["elements"] else 0.0
    return f"{o['mismatched']}/{o['elements']} out of tolerance ({share:.2g}%)"


def _top1(o: dict) -> str:
    t = o.get("top1")
    return "" if t is None else f"; top-1 agreement {t['matched']}/{t['total']} positions"


def _half_distance(o: dict) -> str:
    h = o.get("half_reference_max_abs")
    return "" if h is None else f" (half reference {h:.1e} from float32)"


def _names(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def failed_outputs(report: dict) -> str:
    """The failing outputs in one short phrase."""
    return _names([o["name"] for o in report["outputs"] if not o["passed"]])


def format_report(report: dict) -> str:
    return "\n".join(report_lines(report))


def report_lines(report: dict) -> list[str]:
    """The report, one element per line (the CLI prints each escaped: a name holding a newline stays on its line)."""
    lines = [f"validate {report['model']}",
             f"  against {report['checkpoint']} ({report['reference']})",
             f"  runner  {report['runner_description']}",
             f"  {len(report['prompts'])} prompt(s) of {', '.join(str(len(p)) for p in report['prompts'])} tokens, "
             f"prefill + {report['decode_steps']} greedy decode steps (runner fed the reference's tokens)"]
    if "method" in report:
        lines.append(f"  method  {report['method']['mode']}: {report['method']['description']}")
    if report.get("tolerance"):
        lines.append(f"  bound   {report['tolerance']['description']} ({report['routing_reference']})")
    half = any(o.get("half_reference_max_abs") is not None for o in report["outputs"])
    lines.append("")
    header = (f"{'output':<28} {'max abs diff':>12} {'rel error*':>10}  {'tolerance':<33}"
              + (f" {'half ref':>9}" if half else "") + f" {'out of tol':>14}  result")
    lines += [header, "-" * len(header)]
    for o in report["outputs"]:
        result = "PASS" if o["passed"] else "FAIL" + (f" ({o['error']})" if o["error"] else f" (worst at {o['worst_step']})")
        h = o.get("half_reference_max_abs")
        lines.append(f"{o['name']:<28} {o['max_abs_diff']:>12.3e} {o['max_rel_diff']:>10.1e}  {tolerance_text(o):<33}"
                     + (f" {'' if h is None else format(h, '.3e'):>9}" if half else "")
                     + f" {str(o['mismatched']) + '/' + str(o['elements']):>14}  {result}")
    g = report["greedy_agreement"]
    lines += ["", "* relative error where |reference| >= 1% of its largest |value| (near-zero references say nothing)"]
    top1 = next((o["top1"] for o in report["outputs"] if o.get("top1")), None)
    if top1:
        lines.append(f"top-1 agreement: {top1['matched']}/{top1['total']} positions (the runner's largest logit is the "
                     "reference's)")
    lines.append(f"greedy agreement: {g['matched']}/{g['total']} ({100 * g['fraction']:.1f}%)")
    lines += quantization_lines(report)
    lines += [f"note: {n}" for n in report["notes"]]
    lines.append("PASSED" if report["passed"] else "FAILED")
    return lines
