"""The runner interface every backend implements, so validate and the benchmarks treat them alike.

A runner holds one sequence batch's state (its KV cache):
  prefill(ids [B, S])      starts a new sequence from a prompt, returns the step's outputs
  decode(ids [B, 1])       appends one token per sequence, positions continue the cache
  routes(ids [B, S])       the pre-gate alone: (expert ids [B, S, k] int32, gates [B, S, k] float32),
                           or None where routing is per layer (routers live inside the decoder)
  info                     a ModelInfo: what the model is (layers, vocabulary, KV layout, routing
                           inputs, dtype, metadata); validate reads nothing else about a runner
Arrays are numpy; logits are float32, present keys/values are in the model's dtype.

Every runner sets `self.info` in its constructor; building a runner that did not, or whose
description is incomplete or ill-typed, fails there (RunnerMeta), not later inside validate.
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AdafuseError

DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class StepResult:
    logits: np.ndarray  # [B, S, vocab] float32
    present: dict[str, np.ndarray] = field(default_factory=dict)  # "present.{l}.key" / ".value" -> [B, KV, T, d]
    expert_ids: np.ndarray | None = None  # [B, S, k] int32 (pre-gated models)
    gates: np.ndarray | None = None  # [B, S, k] float32


@dataclass(frozen=True)
class ModelInfo:
    """What a runner runs, as validate compares it with a checkpoint. Values come from the model's own
    files (graph inputs, engine manifest, checkpoint), so a bad value is the model file's fault:
    an AdafuseError naming `model`."""

    model: Path  # the file that runs: decoder .onnx, .engine, or the checkpoint directory
    num_layers: int  # past_key_values.{l}.key/value pairs
    vocab_size: int | None  # last dimension of logits; None when the model leaves it dynamic
    kv_heads: int
    head_dim: int
    needs_routes: bool  # the decoder takes expert_ids/gates inputs (fed from the pre-gate)
    dtype: str  # one of DTYPES: weights, activations and the KV cache
    meta: dict[str, str]  # "adafuse.*" metadata recorded at export ({} when the model has none)
    description: str  # backend details for reports (provider, device, dtype, flavour)

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> AdafuseError:
            return AdafuseError(f"{self.model}: {name} is {getattr(self, name)!r} in this model, expected {expected}")

        for name in ("num_layers", "kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, "a positive integer (a fixed dimension)")
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int) or self.vocab_size < 1):
            raise bad("vocab_size", "a positive integer or unknown")
        if not isinstance(self.needs_routes, bool):
            raise bad("needs_routes", "True or False")
        if self.dtype not in DTYPES:
            raise bad("dtype", f"one of {', '.join(DTYPES)}")
        if not isinstance(self.meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in self.meta.items()):
            raise bad("meta", "a dict of strings")
        if not isinstance(self.model, Path):
            raise TypeError(f"ModelInfo.model must be a Path, found {type(self.model).__name__}")


class RunnerMeta(ABCMeta):
    """Checks, as a runner is built, that its constructor described the model (set `self.info`)."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        runner = super().__call__(*args, **kwargs)
        if not isinstance(runner.__dict__.get("info"), ModelInfo):
            raise TypeError(f"{cls.__name__}.__init__ must set self.info to a ModelInfo "
                            f"(fields: {', '.join(f.name for f in fields(ModelInfo))})")
        return runner


class Runner(metaclass=RunnerMeta):
    name: str = "runner"
    info: ModelInfo

    @abstractmethod
    def prefill(self, input_ids: np.ndarray) -> StepResult:
        """Start a new sequence batch from prompts [B, S] (int64)."""

    @abstractmethod
    def decode(self, input_ids: np.ndarray) -> StepResult:
        """One decode step: input_ids [B, 1] continue the cached sequences."""

    @abstractmethod
    def routes(self, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The pre-gate's (expert ids, gates) for input_ids [B, S], or None for layer-routed models."""

    @property
    @abstractmethod
    def past_length(self) -> int:
        """Tokens held in the cache."""

    def generate(self, prompt_ids: np.ndarray, max_new_tokens: int) -> np.ndarray:
        """Greedy decoding with this runner alone: generated ids [B, max_new_tokens]."""
        out = self.prefill(prompt_ids)
        tokens = []
        for i in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            tokens.append(nxt)
            if i + 1 < max_new_tokens:
                out = self.decode(nxt)
        return np.concatenate(tokens, axis=1) if tokens else np.zeros((prompt_ids.shape[0], 0), np.int64)

    def close(self) -> None:
        pass


def read_routes(path: Path, num_experts: int | None, vocab_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """A routing table file (export-routes' output, an export's routes.safetensors, an engine's routes_file):
    'expert_ids' (integers in [0, num_experts)) and 'gates' (finite, in [0, 1]), both [vocab, top_k], every check made
    before a runner gathers from it or feeds an id to the adapter kernels."""
    from safetensors.numpy import load_file

    from ..onnx.plugin_ops import check_expert_ids
    from ..tensors import read_safetensors_header

    read_safetensors_header(path)  # a bounded, checked header first (regular file, offsets, dtypes)
    tensors = load_file(str(path))
    for key in ("expert_ids", "gates"):
        if key not in tensors:
            raise AdafuseError(f"{path}: missing tensor '{key}' (a routing table holds 'expert_ids' and 'gates', "
                               f"both [vocab, top_k]; found {', '.join(map(repr, tensors)) or 'none'})")
    ids, gates = tensors["expert_ids"], tensors["gates"]
    if ids.dtype.kind not in "iu" or gates.dtype.kind != "f":
        raise AdafuseError(f"{path}: expected integer 'expert_ids' and floating-point 'gates', found {ids.dtype} and {gates.dtype}")
    if ids.ndim != 2 or ids.shape != gates.shape or (vocab_size is not None and ids.shape[0] != vocab_size):
        raise AdafuseError(f"{path}: expected 'expert_ids' and 'gates' of shape [{vocab_size or 'vocab'}, top_k], found "
                           f"{list(ids.shape)} and {list(gates.shape)}")
    if num_experts is not None:
        check_expert_ids(ids, num_experts, f"{path}: 'expert_ids'")
    if not np.isfinite(gates).all():
        raise AdafuseError(f"{path}: 'gates' holds NaN/Inf values, expected finite weights")
    outside = int(((gates < 0) | (gates > 1)).sum())
    if outside:
        raise AdafuseError(f"{path}: 'gates' holds {outside} of {gates.size} weights outside [0, 1]; "
                           "a routing table holds the pre-gate's softmax weights")
    return ids, gates
