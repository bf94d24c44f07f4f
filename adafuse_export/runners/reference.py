"""The PyTorch reference behind the runner interface (the ground truth for validate and benchmarks)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .base import ModelInfo, Runner, StepResult

if TYPE_CHECKING:  # torch is imported when a reference runner is built, not with this module
    from ..reference.model import KVCache


class ReferenceRunner(Runner):
    name = "reference"

    def __init__(self, ckpt, dtype: str = "float32", device: str = "cpu", stream: bool = False):
        """stream: hold one layer's weights at a time (ReferenceModel(stream=True)), for models that do
        not fit in memory twice; same results, the weights are read again on every step."""
        import torch

        from ..reference import ReferenceModel

        self.torch = torch
        self.model = ReferenceModel(ckpt, dtype=getattr(torch, dtype), device=device, stream=stream)
        m = ckpt.model
        self.info = ModelInfo(model=ckpt.path, num_layers=m.num_layers, vocab_size=m.vocab_size, kv_heads=m.num_kv_heads,
                              head_dim=m.head_dim, needs_routes=ckpt.adapter.routing_table_exact, dtype=dtype, meta={},
                              description=f"PyTorch reference, {dtype}, {device}"
                                          + (", weights streamed layer by layer" if stream else ""))
        self.cache: KVCache | None = None
        self._table: tuple[np.ndarray, np.ndarray] | None = None

    def _result(self, out) -> StepResult:
        present = {}
        for layer, (k, v) in enumerate(zip(out.cache.keys, out.cache.values)):
            present[f"present.{layer}.key"] = k.float().cpu().numpy()
            present[f"present.{layer}.value"] = v.float().cpu().numpy()
        ids = out.expert_ids.to(self.torch.int32).cpu().numpy() if out.expert_ids is not None else None
        gates = out.gates.float().cpu().numpy() if out.gates is not None else None
        return StepResult(out.logits.cpu().numpy(), present, ids, gates)

    def prefill(self, input_ids):
        out = self.model(self.torch.as_tensor(np.asarray(input_ids, dtype=np.int64)))
        self.cache = out.cache
        return self._result(out)

    def decode(self, input_ids):
        out = self.model(self.torch.as_tensor(np.asarray(input_ids, dtype=np.int64)), self.cache)
        self.cache = out.cache
        return self._result(out)

    def step_logits(self, input_ids, first: bool):
        """Logits only (no numpy copies of the cache): for benchmarks."""
        t = self.torch.as_tensor(np.asarray(input_ids, dtype=np.int64))
        out = self.model(t) if first else self.model(t, self.cache)
        self.cache = out.cache
        return out.logits

    def routes(self, input_ids):
        if not self.model.pregated:
            return None
        if not self.model.aspec.routing_table_exact:
            return None  # the pre-gate needs layer 0's attention: it is part of the forward pass
        if self._table is None:
            ids, gates = self.model.routing_table()
            self._table = (ids.numpy(), gates.float().numpy())
        x = np.asarray(input_ids)
        return self._table[0][x], self._table[1][x]

    @property
    def past_length(self) -> int:
        return 0 if self.cache is None else self.cache.length
