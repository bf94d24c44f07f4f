"""Exported decoders batch rows of different lengths (onnx/contract.py): one ONNX Runtime batch, driven like the
runtime's in-flight batcher (prompts of different lengths prefilled together, rows decoding at different past
lengths, a prompt joining while the others decode, a slot reused for a new prompt after its sequence ended),
gives every row the logits the PyTorch reference gives that sequence alone, within the float32 tolerance of
ONNX against the reference (1e-4, tests/test_onnx_export.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from adafuse_export.converters import load_checkpoint
from adafuse_export.errors import AdafuseError
from adafuse_export.examples import make_example
from adafuse_export.onnx import contract
from adafuse_export.onnx.export import export_onnx
from adafuse_export.reference import ReferenceModel
from adafuse_export.runners.onnxruntime import OnnxRuntimeRunner
from adafuse_export.validate import TOLERANCES
from family_decode_cases import FEATURES, SCALED

LOGITS_ATOL = 1e-4
PAD = 0

# (family, kind, config): the families whose attention differs (sliding windows with soft-caps, q/k norms,
# partial RoPE, LongRoPE switching on each row's own reach at position 16) and the routed kinds (routes fed
# from the table, the pre-gate inside the decoder, per-layer routers, MixLoRA experts)
CASES = {
    "llama-pregate": ("llama", "pregate", None),
    "llama-pregate-plugin": ("llama", "pregate", None),  # the plugin flavour: adapter nodes as ONNX Runtime custom ops
    "qwen3-mola-float16": ("qwen3", "mola", FEATURES["qwen3"]),  # a float16 graph against the float16 reference
    "gemma2-pregate": ("gemma2", "pregate", FEATURES["gemma2"]),
    "qwen3-pregate": ("qwen3", "pregate", FEATURES["qwen3"]),
    "phi3-pregate": ("phi3", "pregate", FEATURES["phi3"]),
    "phi3.5-longrope-mola": ("phi3", "mola", SCALED["phi3.5-longrope"][1]),
    "llama-pregate-ffn": ("llama", "pregate-ffn", None),
    "mistral-mixlora": ("mistral", "mixlora", FEATURES["mistral"]),
}


@dataclass
class Sequence:
    prompt: list[int]
    new_tokens: int
    tokens: list[int] = field(default_factory=list)  # prompt, then the reference's greedy tokens
    logits: list[np.ndarray] = field(default_factory=list)  # the reference alone: [count, vocab] per step


def reference_alone(ref: ReferenceModel, seq: Sequence) -> None:
    """The sequence run by itself: its prefill, then one decode step per new token (greedy)."""
    gen, steps = ref.generate(torch.tensor([seq.prompt]), seq.new_tokens)
    seq.tokens = seq.prompt + gen[0].tolist()
    seq.logits = [s.logits[0].numpy() for s in steps]


# (prompt, new tokens, slot, step it joins at), as the in-flight batcher places them: three prompts of lengths 7, 3
# and 5 prefilled together (slot 3 idle), a prompt of 4 joining while they decode, and a prompt of 6 taking slot 1
# after its first sequence ended (shorter than what the slot held). Row 0 reaches position 16 mid-decode, where
# LongRoPE switches (phi3.5 case), while the other rows stay below it in the same batch; the 6-token prompt joins
# as row 0 is at 12, so a row that took its padding columns' positions would switch too early.
SEQS = [([3, 17, 250, 4, 99, 0, 255], 12, 0, 0), ([7, 7, 1], 3, 1, 0), ([5, 9, 2, 6, 5], 9, 2, 0),
        ([11, 12, 13, 14], 7, 3, 1), ([21, 22, 23, 24, 25, 26], 4, 1, 6)]
SLOTS = 4


def schedule() -> list[dict[int, tuple[int, int]]]:
    """Per batched step: slot -> (sequence, its step index)."""
    steps: list[dict[int, tuple[int, int]]] = [{} for _ in range(max(join + new for _, new, _, join in SEQS))]
    for s, (_, new, slot, join) in enumerate(SEQS):
        for i in range(new):
            assert slot not in steps[join + i]
            steps[join + i][slot] = (s, i)
    return steps


def run_batched(runner: OnnxRuntimeRunner, seqs: list[Sequence], rtol: float = 0.0) -> float:
    """Drives the runner's in-flight steps by the schedule; the largest |logits - reference| - rtol |reference| over
    every row."""
    worst = 0.0
    for plan in schedule():
        chunks, past = {}, np.zeros(SLOTS, np.int64)
        for slot, (s, i) in plan.items():
            seq = seqs[s]
            start = 0 if i == 0 else len(seq.prompt) + i - 1
            count = len(seq.prompt) if i == 0 else 1
            chunks[slot] = seq.tokens[start:start + count]
            past[slot] = start
        width = max(len(c) for c in chunks.values())
        ids = np.full((SLOTS, width), PAD, np.int64)
        n = np.zeros(SLOTS, np.int64)  # an idle slot: seq_lens 0 carries its cache
        for slot, c in chunks.items():
            ids[slot, :len(c)] = c
            n[slot] = len(c)
        out = runner.step(ids, past, n)
        for slot, (s, i) in plan.items():
            want = seqs[s].logits[i]
            got = out.logits[slot, :n[slot]]
            assert got.shape == want.shape
            worst = max(worst, float((np.abs(got - want) - rtol * np.abs(want)).max()))
    return worst


@pytest.mark.parametrize("name", list(CASES))
def test_rows_of_different_lengths_match_each_sequence_alone(name, tmp_path):
    family, kind, config = CASES[name]
    ckpt = make_example(tmp_path / "ckpt", kind, family=family, config=config)
    flavour = "plugin" if name.endswith("-plugin") else "portable"
    dtype = "float16" if name.endswith("-float16") else "float32"
    atol, rtol = TOLERANCES[dtype]  # validate's, ONNX against the reference
    export_onnx(load_checkpoint(tmp_path / "ckpt"), tmp_path / "onnx", flavour, dtype)
    ref = ReferenceModel(ckpt, dtype=getattr(torch, dtype))
    seqs = [Sequence(prompt, new) for prompt, new, _, _ in SEQS]
    for seq in seqs:
        reference_alone(ref, seq)
    worst = run_batched(OnnxRuntimeRunner(tmp_path / "onnx", device="cpu", plugin_ops="cpu"), seqs,
                        rtol if dtype == "float16" else 0.0)
    assert worst <= (LOGITS_ATOL if dtype == "float32" else atol), f"{name}: logits differ from each sequence alone by {worst:.3g}"


def test_padding_and_idle_rows_leave_the_cache_alone(tmp_path):
    """A step changes a row's cache only at its own new positions: not at its padding columns' positions, not in
    an idle row (seq_lens 0), not before its start."""
    make_example(tmp_path / "ckpt", "lora")
    export_onnx(load_checkpoint(tmp_path / "ckpt"), tmp_path / "onnx", "portable", "float32")
    runner = OnnxRuntimeRunner(tmp_path / "onnx", device="cpu")
    runner.step(np.array([[1, 2, 3, 4, 5, 6], [5, 6, 0, 0, 0, 0]]), [0, 0], [6, 2])  # a cache of 6 positions
    assert runner.past is not None
    before = {k: v.copy() for k, v in runner.past.items()}
    runner.step(np.array([[9, 9, 9], [7, 8, 9]]), [2, 1], [0, 1])  # row 0 idle; row 1 writes position 1 only
    after = runner.past
    assert after is not None and all(v.shape[2] == 6 for v in after.values())
    for name, old in before.items():
        new = after[name]
        assert np.array_equal(new[0], old[0]), name
        assert np.array_equal(new[1, :, :1], old[1, :, :1]) and np.array_equal(new[1, :, 2:], old[1, :, 2:]), name
        assert not np.array_equal(new[1, :, 1], old[1, :, 1]), name  # token 7 replaced token 6 at position 1


def test_contract_positions_and_checks():
    assert contract.positions([0, 5, 2], [3, 1, 0], 3).tolist() == [[0, 1, 2], [5, 5, 5], [2, 2, 2]]
    with pytest.raises(AdafuseError, match=r"row 1: 'past_lengths' 5 and 'seq_lens' 2 must satisfy .* <= 6"):
        contract.check_step([0, 5], [1, 2], 2, 2, 6)
    with pytest.raises(AdafuseError, match=r"'seq_lens' must be 2 integers"):
        contract.check_step([0, 5], [1.0, 2.0], 2, 2, 8)


def test_old_exports_are_refused_with_a_clear_line(tmp_path):
    """A version-1 graph (position_ids, no length per row) is refused by name, not run wrongly."""
    import onnx

    make_example(tmp_path / "ckpt", "lora")
    export_onnx(load_checkpoint(tmp_path / "ckpt"), tmp_path / "onnx", "portable", "float32")
    model = onnx.load(str(tmp_path / "onnx" / "decoder.onnx"))
    for v in model.graph.input:
        if v.name == contract.PAST_LENGTHS:
            v.name = "position_ids"
    onnx.save(model, str(tmp_path / "onnx" / "decoder.onnx"))
    with pytest.raises(AdafuseError, match="decoder input 'past_lengths' not found .* export it again"):
        OnnxRuntimeRunner(tmp_path / "onnx", device="cpu")
