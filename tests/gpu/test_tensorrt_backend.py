"""The C++ runtime's TensorRT backend on the GPU, through the C API: engines converted with `convert --backend
tensorrt` take a length per row (adafuse_export/onnx/contract.py), so the backend steps (in_flight): prompts of
different lengths prefilled together, a prompt joining while the others decode, a slot reused by a new prompt
after its sequence ended; each row's greedy tokens equal the reference decoding that prompt alone, and the
equal-length calls (adafuse_prefill/adafuse_decode) still give the reference's logits.

Needs full TensorRT 10 (pip install tensorrt-cu12==10.* or tensorrt-cu13==10.*) and the runtime built for this GPU:
runtime/tools/build_on_gpu.sh, then ADAFUSE_RUNTIME_LIB=<its output> (and ADAFUSE_PLUGIN_LIB for plugin engines).
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from adafuse_export.converters import load_checkpoint
from adafuse_export.convert import convert
from adafuse_export.examples import make_example
from adafuse_export.reference import ReferenceModel
from adafuse_export.runners.cpp_runtime import _OpenOptions, _StepRow, load_library
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


class Engine:
    """A TensorRT engine opened through the C API (main's cpp_runtime.Engine does this once merged)."""

    def __init__(self, lib, path: Path):
        self.lib = lib
        options = _OpenOptions(str(path).encode(), None, None, 0, 1, None)
        self.handle = ctypes.c_void_p()
        assert lib.adafuse_engine_open(ctypes.byref(options), ctypes.byref(self.handle)) == 0, lib.adafuse_last_error().decode()
        b, s, v = ctypes.c_int32(), ctypes.c_int32(), ctypes.c_int64()
        lib.adafuse_engine_limits(self.handle, ctypes.byref(b), ctypes.byref(s), ctypes.byref(v))
        self.max_batch, self.vocab = b.value, v.value
        in_flight, step_tokens = ctypes.c_int32(), ctypes.c_int32()
        lib.adafuse_step_limits(self.handle, ctypes.byref(in_flight), ctypes.byref(step_tokens))
        assert in_flight.value == 1 and step_tokens.value >= self.max_batch  # the engine steps

    def _ok(self, status: int) -> None:
        assert status == 0, self.lib.adafuse_last_error().decode()

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(ids, np.int64)
        logits = np.full((*ids.shape, self.vocab), np.nan, np.float32)  # NaN-poisoned: every value must be written
        self._ok(self.lib.adafuse_prefill(self.handle, ids.ctypes.data, ids.shape[0], ids.shape[1], logits.ctypes.data,
                                          None, None))
        return logits

    def decode(self, ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(ids, np.int64).reshape(-1)
        logits = np.full((ids.shape[0], self.vocab), np.nan, np.float32)
        self._ok(self.lib.adafuse_decode(self.handle, ids.ctypes.data, ids.shape[0], logits.ctypes.data, None, None))
        return logits

    def step(self, rows: list[tuple[int, int, list[int]]]) -> list[np.ndarray]:
        """rows of (slot, start, new tokens) -> each row's last-position logits."""
        table = (_StepRow * len(rows))(*[_StepRow(slot, start, len(toks), 0) for slot, start, toks in rows])
        ids = np.array([t for _, _, toks in rows for t in toks], np.int64)
        logits = np.full((len(rows), self.vocab), np.nan, np.float32)
        self._ok(self.lib.adafuse_step(self.handle, ids.ctypes.data, table, len(rows), logits.ctypes.data, None, None))
        return list(logits)

    def close(self) -> None:
        if self.handle:
            self.lib.adafuse_engine_free(self.handle)
            self.handle = ctypes.c_void_p()


def tensorrt_engine(ckpt_dir: Path, out: Path) -> Path:
    """A full TensorRT engine (the plugin flavour: its plugin library from $ADAFUSE_PLUGIN_LIB, as the runtime opens it)."""
    engine = out / "m.engine"
    plugins = os.environ.get("ADAFUSE_PLUGIN_LIB")
    convert(ckpt_dir, engine, backend="tensorrt", dtype="float32", max_batch=4, max_seq=40,
            plugin_library=Path(plugins) if plugins else None, log=lambda s: None)
    return engine


@pytest.mark.parametrize("kind,family,config", [
    ("pregate", "llama", None), ("pregate-ffn", "qwen3", FEATURES["qwen3"]), ("mola", "phi3", FEATURES["phi3"]),
    ("mixlora", "gemma2", FEATURES["gemma2"])])
def test_in_flight_rows_of_different_lengths(lib, tmp_path, kind, family, config):
    make_example(tmp_path / "ck", kind, family, config=config)
    ref = ReferenceModel(load_checkpoint(tmp_path / "ck"), dtype=torch.float32)
    want = [ref.generate(torch.tensor([p]), n)[0][0].tolist() for (p, _, _), n in zip(PROMPTS, BUDGET)]
    engine = Engine(lib, tensorrt_engine(tmp_path / "ck", tmp_path))  # asserts in_flight == 1
    try:
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
        assert got == want
    finally:
        engine.close()


def test_equal_length_calls_match_the_reference(lib, tmp_path):
    """adafuse_prefill / adafuse_decode run as steps of slots 0..batch-1: logits within the float32 bound."""
    make_example(tmp_path / "ck", "pregate", "llama")
    ref = ReferenceModel(load_checkpoint(tmp_path / "ck"), dtype=torch.float32)
    prompts = np.array([[3, 1, 4, 1, 5], [2, 7, 1, 8, 2]])
    want = ref.forward(torch.tensor(prompts)).logits.numpy()
    engine = Engine(lib, tensorrt_engine(tmp_path / "ck", tmp_path))
    try:
        logits = engine.prefill(prompts)
        assert np.abs(logits - want).max() <= LOGITS_ATOL
        nxt = logits[:, -1].argmax(-1)
        full = np.concatenate([prompts, nxt[:, None]], axis=1)
        step = engine.decode(nxt)
        assert np.abs(step - ref.forward(torch.tensor(full)).logits[:, -1].numpy()).max() <= LOGITS_ATOL
    finally:
        engine.close()
