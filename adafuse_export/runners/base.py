"""The runner interface every backend implements, so validate and the benchmarks treat them alike.

A runner holds one sequence batch's state (its KV cache):
  prefill(ids [B, S])      starts a new sequence from a prompt, returns the step's outputs
  decode(ids [B, 1])       appends one token per sequence, positions continue the cache
  routes(ids [B, S])       the pre-gate alone: (expert ids [B, S, k] int32, gates [B, S, k] float32),
                           or None where routing is per layer (routers live inside the decoder)
Arrays are numpy; logits are float32, present keys/values are in the model's dtype.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np


@dataclass
class StepResult:
    logits: np.ndarray  # [B, S, vocab] float32
    present: dict[str, np.ndarray] = field(default_factory=dict)  # "present.{l}.key" / ".value" -> [B, KV, T, d]
    expert_ids: np.ndarray | None = None  # [B, S, k] int32 (pre-gated models)
    gates: np.ndarray | None = None  # [B, S, k] float32


class Runner(ABC):
    name: str = "runner"
    description: str = ""  # backend details for reports (provider, dtype, flavour)

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
