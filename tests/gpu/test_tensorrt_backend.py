"""The C++ runtime's TensorRT backend on the GPU, through the C API: engines converted with `convert --backend
tensorrt` take a length per row (adafuse_export/onnx/contract.py), so the backend steps (in_flight): prompts of
different lengths prefilled together, a prompt joining while the others decode, a slot reused by a new prompt
after its sequence ended; each row's greedy tokens equal the reference decoding that prompt alone, and the
equal-length calls (adafuse_prefill/adafuse_decode) still give the reference's logits.

Needs full TensorRT 10 (pip install tensorrt-cu12==10.* or tensorrt-cu13==10.*) and the runtime built for this GPU:
runtime/tools/build_on_gpu.sh, then ADAFUSE_RUNTIME_LIB=<its output> (and ADAFUSE_PLUGIN_LIB for plugin engines).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from adafuse_export.converters import load_checkpoint
from adafuse_export.convert import convert
from adafuse_export.examples import make_example
from adafuse_export.reference import ReferenceModel
from adafuse_export.runners.cpp_runtime import Engine, load_library
from family_decode_cases import FEATURES, LOGITS_ATOL

pytestmark = pytest.mark.tensorrt  # not gpu: `pytest -m gpu` runs where TensorRT is absent (the H200)
NEW_TOKENS = 8
# (prompt, slot, step it joins at): three prefill together, one joins while they decode, one takes slot 1 after
# its first sequence (3 tokens, the shortest budget) ended
PROMPTS = [([3, 1, 4, 1, 5, 9, 2], 0, 0), ([2, 7], 1, 0), ([1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9], 2, 0), ([6, 6, 6], 3, 2),
           ([9, 9, 4, 4, 2], 1, 4)]
BUDGET = [NEW_TOKENS, 3, NEW_TOKENS, NEW_TOKENS, NEW_TOKENS]


@pytest.fixture(scope="module")
def lib():
    path = os.environ.get("ADAFUSE_RUNTIME_LIB")
    assert path, "set ADAFUSE_RUNTIME_LIB to the runtime built by runtime/tools/build_on_gpu.sh"
    return load_library(path)


def tensorrt_engine(ckpt_dir: Path, out: Path) -> Engine:
    """A full TensorRT engine (the plugin flavour: its plugin library from $ADAFUSE_PLUGIN_LIB, as the runtime opens it),
    opened through the C API; it steps (in_flight)."""
    path = out / "m.engine"
    plugins = os.environ.get("ADAFUSE_PLUGIN_LIB")
    convert(ckpt_dir, path, backend="tensorrt", dtype="float32", max_batch=4, max_seq=40,
            plugin_library=Path(plugins) if plugins else None, log=lambda s: None)
    engine = Engine(path, top_k=0)
    assert engine.in_flight and engine.max_step_tokens >= engine.max_batch
    return engine


@pytest.mark.parametrize("kind,family,config", [
    ("pregate", "llama", None), ("pregate-ffn", "qwen3", FEATURES["qwen3"]), ("mola", "phi3", FEATURES["phi3"]),
    ("mixlora", "gemma2", FEATURES["gemma2"])])
def test_in_flight_rows_of_different_lengths(lib, tmp_path, kind, family, config):
    make_example(tmp_path / "ck", kind, family, config=config)
    ref = ReferenceModel(load_checkpoint(tmp_path / "ck"), dtype=torch.float32)
    want = [ref.generate(torch.tensor([p]), n)[0][0].tolist() for (p, _, _), n in zip(PROMPTS, BUDGET)]
    with tensorrt_engine(tmp_path / "ck", tmp_path) as engine:
        assert in_flight_tokens(engine) == want


def in_flight_tokens(engine: Engine) -> list[list[int]]:
    """Each prompt's greedy tokens, the rows stepped as PROMPTS places them."""
    got: list[list[int]] = [[] for _ in PROMPTS]
    length = {}
    active: dict[int, int] = {}  # slot -> sequence
    for step in range(40):
        for s, (_, slot, join) in enumerate(PROMPTS):
            if join == step:
                assert slot not in active
                active[slot], length[s] = s, 0
        if not active:
            break
        rows = [(slot, length[s], PROMPTS[s][0] if length[s] == 0 else [got[s][-1]]) for slot, s in active.items()]
        for (slot, start, toks), logits in zip(rows, engine.step(rows)):
            s = active[slot]
            assert not np.isnan(logits).any()
            length[s] = start + len(toks)
            got[s].append(int(logits.argmax()))
            if len(got[s]) == BUDGET[s]:
                del active[slot]
    return got


def test_an_in_place_engine_steps_as_the_copy_engine_does(lib, tmp_path, monkeypatch):
    """TensorRT >= 10.15: convert exports the in-place KV form (TensorScatter, IKVCacheUpdateLayer) and the backend
    binds present.{l} where past_key_values.{l} is (one cache, runtime/README.md "The KV cache"). The same in-flight
    steps give the reference's tokens on it and on a copy-form engine of the same checkpoint; the Python runner
    (present bound to its past's tensor) passes validate."""
    import json

    import tensorrt

    from adafuse_export.runners.tensorrt import TensorRTRunner
    from adafuse_export.trt import backends
    from adafuse_export.validate import validate

    if backends.Backend("tensorrt", tensorrt, tensorrt.__version__).kv_update != "in-place":
        pytest.skip(f"TensorRT {tensorrt.__version__} updates no cache in place (from 10.15): nothing of this ran")
    make_example(tmp_path / "ck", "mixlora", "gemma2", config=FEATURES["gemma2"])
    ref = ReferenceModel(load_checkpoint(tmp_path / "ck"), dtype=torch.float32)
    want = [ref.generate(torch.tensor([p]), n)[0][0].tolist() for (p, _, _), n in zip(PROMPTS, BUDGET)]
    forms = {}
    for form in ("in-place", "copy"):
        if form == "copy":
            monkeypatch.setattr(backends.Backend, "kv_update", property(lambda self: "copy"))
        (tmp_path / form).mkdir()
        with tensorrt_engine(tmp_path / "ck", tmp_path / form) as engine:
            forms[form] = in_flight_tokens(engine)
        manifest = json.loads((tmp_path / form / "m.json").read_text())
        assert manifest["engine"].get("kv_in_place", False) is (form == "in-place")
    assert forms["in-place"] == forms["copy"] == want
    report = validate(load_checkpoint(tmp_path / "ck"), tmp_path / "in-place" / "m.engine", steps=4,
                      runner=TensorRTRunner(tmp_path / "in-place" / "m.engine"))
    assert report["passed"], report


def test_equal_length_calls_match_the_reference(lib, tmp_path):
    """adafuse_prefill / adafuse_decode run as steps of slots 0..batch-1: logits within the float32 bound."""
    make_example(tmp_path / "ck", "pregate", "llama")
    ref = ReferenceModel(load_checkpoint(tmp_path / "ck"), dtype=torch.float32)
    prompts = np.array([[3, 1, 4, 1, 5], [2, 7, 1, 8, 2]])
    want = ref.forward(torch.tensor(prompts)).logits.numpy()
    with tensorrt_engine(tmp_path / "ck", tmp_path) as engine:
        logits, _, _ = engine.prefill(prompts)
        assert np.abs(logits - want).max() <= LOGITS_ATOL
        nxt = logits[:, -1].argmax(-1)
        full = np.concatenate([prompts, nxt[:, None]], axis=1)
        step, _, _ = engine.decode(nxt)
        assert np.abs(step - ref.forward(torch.tensor(full)).logits[:, -1].numpy()).max() <= LOGITS_ATOL
