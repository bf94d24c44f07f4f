"""X-LoRA in the reference (routing 'xlora'; docs/formats/xlora.md), after PEFT's `tuners/xlora`.

Each step runs the decoder twice over the same tokens, each pass with its own KV cache:
  1. scaling pass: every expert's scaling at every site is the constant `scaling_pass_value`
     (PEFT's dummy scalings; 0 by default, i.e. the base model);
  2. the classifier (Linear, ReLU, ..., Linear) reads the pass's last hidden state (after the final
     norm) and gives scalings [tokens, sites, E] (one set broadcast to every site unless
     `layerwise_scalings`), softmaxed over E with a temperature when `enable_softmax`;
  3. the real pass: site j adds  global_scaling_weight * sum_e g_e B_e A_e x  with g the site's
     scalings after PEFT's optional top-k mask and softmax over the kept ones.
Both passes use the same top-k/softmax step on their scalings, as PEFT does. Each expert's LoRA scale is
folded into its B by the converter, so the site scale is 1. Sites are numbered layer by layer in
`module_order` (PEFT numbers its LoRA layers in transformers' module order).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..checkpoint import Checkpoint
from .model import KVCache, StepOutput


def site_order(ckpt: Checkpoint) -> list[tuple[int, str]]:
    """(layer, module) of PEFT's LoRA layer numbers 0, 1, ...: the scalings' site axis."""
    assert ckpt.adapter.xlora is not None
    return [(layer, m) for layer in range(ckpt.model.num_layers) for m in ckpt.adapter.xlora.module_order]


@dataclass
class XLoraCache(KVCache):
    """The real pass's cache (KVCache itself) plus the scaling pass's."""
    scaling: KVCache | None = None


class XLoraMixer:
    def __init__(self, ckpt: Checkpoint, weights):
        assert ckpt.adapter.xlora is not None
        self.spec, self.experts = ckpt.adapter.xlora, ckpt.adapter.num_experts
        self.index = {site: j for j, site in enumerate(site_order(ckpt))}
        self.weights = weights
        self.scalings: torch.Tensor | None = None  # [tokens, sites, E] of the pass being run

    def _maybe_topk(self, scalings: torch.Tensor) -> torch.Tensor:
        """PEFT XLoraLayer.get_maybe_topk_scalings on [tokens, E]."""
        if self.spec.top_k_lora is not None:
            _, top = torch.topk(scalings, k=min(self.spec.top_k_lora, self.experts), dim=-1)
            mask = torch.zeros_like(scalings, dtype=torch.bool).scatter_(-1, top, True)
            scalings = scalings * mask.to(scalings.dtype)
        if self.spec.enable_softmax_topk:
            kept = scalings != 0
            scalings = torch.softmax(scalings.masked_fill(~kept, float("-inf")), dim=-1).masked_fill(~kept, 0.0)
        return scalings

    def route(self, layer: int, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert ids, gates) [tokens, E] of a site in the pass being run."""
        assert self.scalings is not None, "X-LoRA route asked for outside a pass"
        gates = self._maybe_topk(self.scalings[:, self.index[(layer, module)]]) * self.spec.global_scaling_weight
        ids = torch.arange(self.experts, device=gates.device).expand(gates.shape[0], -1)
        return ids, gates

    def classify(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scalings [tokens, sites, E] (float32) from the scaling pass's last hidden state [tokens, hidden]."""
        h = hidden.to(torch.float32)
        for j in range(self.spec.classifier_depth):
            if j:
                h = torch.relu(h)
            h = h @ self.weights[f"xlora.classifier.{j}.weight"].to(torch.float32).T \
                + self.weights[f"xlora.classifier.{j}.bias"].to(torch.float32)
        sites = len(self.index)
        logits = h.reshape(-1, sites, self.experts) if self.spec.layerwise_scalings \
            else h[:, None, :].expand(-1, sites, -1)
        if self.spec.enable_softmax:
            logits = torch.softmax(logits / self.spec.softmax_temperature, dim=-1)
        return logits

    def forward(self, run: Callable[[torch.Tensor, KVCache], StepOutput], input_ids: torch.Tensor,
                cache: KVCache | None, num_layers: int) -> StepOutput:
        """Both passes over input_ids [B, S]; `run` is one decoder pass that routes through self.route."""
        if cache is None:
            cache = XLoraCache([None] * num_layers, [None] * num_layers, KVCache([None] * num_layers, [None] * num_layers))
        if not isinstance(cache, XLoraCache) or cache.scaling is None:
            raise TypeError("an X-LoRA model continues only the XLoraCache it returned")
        tokens = input_ids.numel()
        self.scalings = torch.full((tokens, len(self.index), self.experts), self.spec.scaling_pass_value,
                                   device=input_ids.device)
        try:
            first = run(input_ids, cache.scaling)
            assert first.hidden is not None
            self.scalings = self.classify(first.hidden.reshape(tokens, -1))
            return run(input_ids, cache)
        finally:
            self.scalings = None
