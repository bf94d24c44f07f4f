"""The exported decoder's tensor contract, written once: the builder declares these tensors, the ONNX Runtime
and TensorRT runners feed them, and the C++ runtime reads the same names from runtime/src/decoder_contract.h,
which is generated from this module (`python -m adafuse_export.onnx.contract > runtime/src/decoder_contract.h`;
tests/test_decoder_contract.py checks the two agree).

Each row of a batch is its own sequence with its own length (in-flight batching):
  input_ids     int64 [batch, seq]        row b's new tokens in its first seq_lens[b] columns; the rest is
                                          padding (any in-vocabulary id), computed but never stored
  past_lengths  int64 [batch]             tokens row b's cache holds before the step: its first new token
                                          takes position past_lengths[b]
  seq_lens      int64 [batch]             new tokens of row b, 0 .. seq (0: the row is carried unchanged)
  expert_ids    int32 [batch, seq, top_k] routes fed in (pre-gated models with a routing table)
  gates         float [batch, seq, top_k]
  past_key_values.{l}.key/value  [batch, kv_heads, cache_len, head_dim]  the cache: position p at index p
Outputs:
  logits        float [batch, seq, vocab] (padding columns hold finite values of no meaning)
  present.{l}.key/value  [batch, kv_heads, cache_len, head_dim]  the cache with row b's new keys/values
                at indices past_lengths[b] .. past_lengths[b] + seq_lens[b] - 1, every other entry copied
  expert_ids, gates  (outputs when the pre-gate runs inside the decoder)

Requirements on the caller: past_lengths[b] + seq_lens[b] <= cache_len, and the cache holds finite values
everywhere (zero it when it is allocated): an entry beyond a row's length is masked out of attention, but a
masked NaN would still reach the output through 0 * NaN.
A padding column j >= seq_lens[b] takes position past_lengths[b] + seq_lens[b] - 1 (the row's last), so a
row's largest position is its own reach (LongRoPE switches on it) whatever the batch's width.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

# The contract's version: the ONNX export's and the engine manifest's "version" (1 was one length per batch:
# position_ids and a concatenated cache).
VERSION = 2

INPUT_IDS, PAST_LENGTHS, SEQ_LENS = "input_ids", "past_lengths", "seq_lens"
EXPERT_IDS, GATES, LOGITS = "expert_ids", "gates", "logits"
PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."
CACHE_AXIS = "cache_len"  # the cache's length axis (dynamic in the ONNX graph; an engine binds its max_seq)


def past_name(layer: int, value: bool) -> str:
    return f"{PAST_PREFIX}{layer}.{'value' if value else 'key'}"


def present_name(layer: int, value: bool) -> str:
    return f"{PRESENT_PREFIX}{layer}.{'value' if value else 'key'}"


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # the manifest's spelling of a fixed dtype; "model" for the KV cache's (half, bf16 or float)
    shape: tuple[str, ...]  # axis names
    io: str  # "input" or "output"
    when: str  # "always", "routes_in", "routes_out", "per_layer"


TENSORS: tuple[Tensor, ...] = (
    Tensor(INPUT_IDS, "int64", ("batch", "seq"), "input", "always"),
    Tensor(PAST_LENGTHS, "int64", ("batch",), "input", "always"),
    Tensor(SEQ_LENS, "int64", ("batch",), "input", "always"),
    Tensor(EXPERT_IDS, "int32", ("batch", "seq", "top_k"), "input", "routes_in"),
    Tensor(GATES, "float", ("batch", "seq", "top_k"), "input", "routes_in"),
    Tensor(PAST_PREFIX + "{l}.key", "model", ("batch", "kv_heads", CACHE_AXIS, "head_dim"), "input", "per_layer"),
    Tensor(PAST_PREFIX + "{l}.value", "model", ("batch", "kv_heads", CACHE_AXIS, "head_dim"), "input", "per_layer"),
    Tensor(LOGITS, "float", ("batch", "seq", "vocab"), "output", "always"),
    Tensor(PRESENT_PREFIX + "{l}.key", "model", ("batch", "kv_heads", CACHE_AXIS, "head_dim"), "output", "per_layer"),
    Tensor(PRESENT_PREFIX + "{l}.value", "model", ("batch", "kv_heads", CACHE_AXIS, "head_dim"), "output", "per_layer"),
    Tensor(EXPERT_IDS, "int32", ("batch", "seq", "top_k"), "output", "routes_out"),
    Tensor(GATES, "float", ("batch", "seq", "top_k"), "output", "routes_out"),
)


def positions(past_lengths, seq_lens, seq: int):
    """The positions [batch, seq] the graph gives its columns (numpy; the graph builds the same in-graph)."""
    import numpy as np

    past, n = np.asarray(past_lengths, np.int64), np.asarray(seq_lens, np.int64)
    return past[:, None] + np.minimum(np.arange(seq, dtype=np.int64)[None], np.maximum(n - 1, 0)[:, None])


def check_step(past_lengths, seq_lens, batch: int, seq: int, cache_len: int) -> None:
    """Refuses lengths outside the contract (one line naming the tensor, expected vs found)."""
    import numpy as np

    from ..errors import AdafuseError

    for name, v in ((PAST_LENGTHS, past_lengths), (SEQ_LENS, seq_lens)):
        a = np.asarray(v)
        if a.shape != (batch,) or a.dtype.kind not in "iu":
            raise AdafuseError(f"'{name}' must be {batch} integers (one per row), found {a.dtype} {list(a.shape)}")
    past, n = np.asarray(past_lengths, np.int64), np.asarray(seq_lens, np.int64)
    bad = np.flatnonzero((past < 0) | (n < 0) | (n > seq) | (past + n > cache_len))
    if bad.size:
        b = int(bad[0])
        raise AdafuseError(f"row {b}: '{PAST_LENGTHS}' {int(past[b])} and '{SEQ_LENS}' {int(n[b])} must satisfy "
                           f"0 <= {SEQ_LENS} <= {seq} (the ids' width) and {PAST_LENGTHS} + {SEQ_LENS} <= {cache_len} "
                           f"(the cache's length)")


def _cpp_name(name: str) -> str:
    return "k" + "".join(part.capitalize() for part in name.replace(".", "_").replace("{l}", "").split("_") if part)


def cpp_header() -> str:
    """runtime/src/decoder_contract.h: the same names and version for the C++ runtime."""
    lines = ["// The exported decoder's tensor contract for the C++ runtime. GENERATED from adafuse_export/onnx/contract.py",
             "// (python -m adafuse_export.onnx.contract > runtime/src/decoder_contract.h); do not edit:",
             "// tests/test_decoder_contract.py checks that it matches. contract.py's docstring says what each tensor means.",
             "#pragma once", "", "namespace adafuse::decoder_contract {", "",
             f"inline constexpr int kVersion = {VERSION};",
             f'inline constexpr const char* kPastPrefix = "{PAST_PREFIX}";  // + layer + ".key" / ".value"',
             f'inline constexpr const char* kPresentPrefix = "{PRESENT_PREFIX}";']
    seen = set()
    for t in TENSORS:
        if t.when == "per_layer" or t.name in seen:
            continue
        seen.add(t.name)
        lines.append(f'inline constexpr const char* {_cpp_name(t.name)} = "{t.name}";  // {t.dtype} [{", ".join(t.shape)}]')
    lines += ["", "}  // namespace adafuse::decoder_contract", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(cpp_header())
