"""The decoder of every registered family (families/) with mixture-of-LoRA-experts adapters.

Written from the math, not from Hugging Face code, so that it can also serve as the
specification for the ONNX graphs and kernels. It reads the family's description (norms,
projections, activation, RoPE, attention extras) and never its name. Matches transformers'
float32 logits with adapters off (tests/test_reference.py, tests/test_families.py).

Adapter modes (AdapterSpec.routing / expert_kind):
  pregate            one router at the first adapted input; the same (experts, gates)
                     apply at every routed site: y = W x + s * sum_k g_k B_k A_k x
  layerwise/linear   a router per projection (MoLA top-k, LoRAMoE dense softmax)
  layerwise/ffn      MixLoRA: a router per FFN; expert e is the FFN with LoRA e on
                     gate/up/down; out = sum_k w_k FFN_e(x)
  static modules     one always-on LoRA (plain PEFT LoRA, MixLoRA attention)
  xlora              PEFT X-LoRA: two passes per step, reference/xlora.py
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from ..checkpoint import Checkpoint, Site
from ..errors import AdafuseError
from ..families import EMBED, FINAL_NORM, LM_HEAD, STAGES, features
from ..families.features import TORCH
from ..spec import ModelSpec


# The features' definitions (families/features.py) over torch tensors, under the names the backends use.
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, kind: str = "rms") -> torch.Tensor:
    """The RMSNorm of a norm kind (families.base.NORMS): features.rms_norm."""
    return features.rms_norm(TORCH, x, weight, eps, kind)


def spec_norm(spec: ModelSpec, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The family's RMSNorm."""
    return rms_norm(x, weight, spec.rms_norm_eps, spec.arch.norm)


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """The MLP activation (families.base.ACTIVATIONS) applied to the gate: features.activation."""
    return features.activation(TORCH, name, x)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of each head (all of them unless the rotary is partial)."""
    return features.apply_rope(TORCH, x, cos, sin, cos.shape[-1], x.shape[-1])


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return features.softcap(TORCH, x, cap)


def embed_tokens(spec: ModelSpec, embed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Embedding rows times the family's scale (rounded to the model dtype, as transformers does)."""
    h = embed[ids]
    return h if spec.embed_scale == 1.0 else h * torch.tensor(spec.embed_scale, dtype=h.dtype)


def route_topk(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, top_k: int,
               normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax router in float32: (expert ids [N, k] int64, gates [N, k] float32).

    Equal probabilities go to the lower expert id first, as ONNX TopK specifies (torch.topk leaves the
    order of ties open): a token whose embedding row is zero, like the pad row transformers writes,
    routes uniformly, and its experts must not depend on the backend."""
    logits = x.to(torch.float32) @ weight.to(torch.float32).T
    if bias is not None:
        logits = logits + bias.to(torch.float32)
    probs = torch.softmax(logits, dim=-1)
    gates, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    gates, ids = gates[..., :top_k], ids[..., :top_k]
    if normalize:
        gates = gates / gates.sum(-1, keepdim=True)
    return ids, gates


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor,
               scale: float) -> torch.Tensor:
    """scale * sum_j gates[n,j] * B[ids[n,j]] @ A[ids[n,j]] @ x[n], for x [N, in] -> [N, out]."""
    t = torch.einsum("nkri,ni->nkr", A[ids], x)  # [N, k, r]
    t = t * gates.to(t.dtype)[..., None]
    return torch.einsum("nkor,nkr->no", B[ids], t) * scale


def routing_table(spec: ModelSpec, embed: torch.Tensor, norm0: torch.Tensor, pregate_w: torch.Tensor,
                  pregate_b: torch.Tensor | None, top_k: int, normalize: bool, chunk: int = 8192):
    """The pre-gate of RMSNorm_0(embed(token)) for every token: ids [vocab, k] int32, gates [vocab, k] float32."""
    ids, gates = [], []
    for start in range(0, embed.shape[0], chunk):
        rows = embed_tokens(spec, embed, torch.arange(start, min(start + chunk, embed.shape[0])))
        i, g = route_topk(spec_norm(spec, rows, norm0), pregate_w, pregate_b, top_k, normalize)
        ids.append(i.to(torch.int32))
        gates.append(g)
    return torch.cat(ids), torch.cat(gates)


@dataclass
class KVCache:
    keys: list[torch.Tensor]  # per layer [B, KV, T, d]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0


@dataclass
class StepOutput:
    logits: torch.Tensor  # [B, S, vocab] float32
    cache: KVCache
    expert_ids: torch.Tensor | None  # [B, S, k] int64 (pre-gated checkpoints)
    gates: torch.Tensor | None  # [B, S, k] float32
    hidden: torch.Tensor | None = None  # [B, S, hidden] after the final norm


_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.")


class LayerWeights(Mapping[str, torch.Tensor]):
    """Weights by name, read from the checkpoint one layer at a time (the streaming reference).

    Names outside any layer (embeddings, final norm, lm_head, pre-gate) stay resident. A layer's
    tensors are read on first use and dropped, with the source's file maps, as soon as a tensor of
    another layer is asked for: a forward pass walks the layers in order, so it holds one layer's
    weights at a time and reads each once per pass.
    """

    def __init__(self, source, names, load):
        self.source, self.load = source, load
        self.names = set(names)
        self.resident: dict[str, torch.Tensor] = {}
        self.layer: int | None = None
        self.current: dict[str, torch.Tensor] = {}
        for n in self.names:
            if _LAYER.match(n) is None:
                self.resident[n] = load(source, n)

    def __contains__(self, name: object) -> bool:
        return name in self.names or name in self.resident

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.resident[name] = value

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.resident:
            return self.resident[name]
        if name not in self.names:
            raise KeyError(name)
        layer = int(_LAYER.match(name).group(1))  # type: ignore[union-attr]
        if layer != self.layer:
            self.current = {}
            self.source.release()
            self.layer = layer
        if name not in self.current:
            self.current[name] = self.load(self.source, name)
        return self.current[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names | self.resident.keys())

    def __len__(self) -> int:
        return len(self.names | self.resident.keys())


class ReferenceModel:
    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 adapters: bool = True, stream: bool = False):
        """stream: read each layer's weights (and adapters) while that layer runs and drop them after
        (LayerWeights): memory of one layer instead of the model, at the cost of reading the weights
        again on every forward pass. Same arithmetic, so the same results."""
        self.ckpt, self.spec, self.aspec = ckpt, ckpt.model, ckpt.adapter
        self.dtype, self.device, self.use_adapters = dtype, torch.device(device), adapters

        def load(src, name):
            return src.get(name).to(device=self.device, dtype=dtype)

        base_names = list(self.spec.hf_weight_shapes())
        adapter_names = ckpt.adapters.names() if adapters else []
        self.w: dict[str, torch.Tensor] | LayerWeights
        self.a: dict[str, torch.Tensor] | LayerWeights
        if stream:
            self.w = LayerWeights(ckpt.base, base_names, load)
            self.a = LayerWeights(ckpt.adapters, adapter_names, load)
        else:
            self.w = {n: load(ckpt.base, n) for n in base_names}
            self.a = {n: load(ckpt.adapters, n) for n in adapter_names}
        if self.spec.tie_word_embeddings:
            self.w[LM_HEAD] = self.w[EMBED]
        self.sites: dict[tuple[int, str], Site] = {(s.layer, s.module): s for s in ckpt.sites()} if adapters else {}
        self.scales = {s.name: self.aspec.site_scale(s.name) for s in self.sites.values()}
        self.xlora = None
        if adapters and self.aspec.routing == "xlora":
            from .xlora import XLoraMixer
            self.xlora = XLoraMixer(ckpt, self.a)

    # ---- routing -------------------------------------------------------------
    @property
    def pregated(self) -> bool:
        return self.use_adapters and self.aspec.routing == "pregate"

    def pregate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-gate on its input hidden state x [..., hidden] -> ids, gates [..., k]."""
        lead = x.shape[:-1]
        ids, gates = route_topk(x.reshape(-1, x.shape[-1]), self.a["pregate.weight"], self.a.get("pregate.bias"),
                                self.aspec.top_k, self.aspec.normalize_topk)
        return ids.reshape(*lead, -1), gates.reshape(*lead, -1)

    def routing_table(self, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact pre-gate as a table: expert ids [vocab, k] int32 and gates [vocab, k] float32."""
        self.ckpt.require_routing_table()
        norm0 = self.w[self.spec.arch.norm_weight(0, self.spec.arch.norms.attn_in)]
        return routing_table(self.spec, self.w[EMBED], norm0, self.a["pregate.weight"], self.a.get("pregate.bias"),
                             self.aspec.top_k, self.aspec.normalize_topk, chunk)

    # ---- layers ----------------------------------------------------------------
    def _adapted(self, x: torch.Tensor, layer: int, module: str, route, ffn_expert=None) -> torch.Tensor:
        """One projection with its adapter. x [N, in] -> [N, out].

        route: pre-gate (ids, gates) [N, k] for routed sites; ffn_expert: ids [N, 1] of the
        MixLoRA expert being evaluated.
        """
        p = self.spec.arch.weight_prefix(layer, module)
        y = x @ self.w[f"{p}.weight"].T
        if f"{p}.bias" in self.w:
            y = y + self.w[f"{p}.bias"]
        site = self.sites.get((layer, module))
        if site is None:
            return y
        A, B, scale = self.a[f"{site.name}.lora_A"], self.a[f"{site.name}.lora_B"], self.scales[site.name]
        if site.static:
            ids = torch.zeros(x.shape[0], 1, dtype=torch.int64, device=x.device)
            return y + lora_delta(x, A, B, ids, torch.ones(ids.shape, device=x.device), scale)
        if self.xlora is not None:
            route = self.xlora.route(layer, module)
        if self.aspec.expert_kind == "ffn":
            ones = torch.ones(ffn_expert.shape, device=x.device)
            return y + lora_delta(x, A, B, ffn_expert, ones, scale)
        if self.aspec.routing == "layerwise":
            k = A.shape[0] if self.aspec.router_kind == "dense" else self.aspec.top_k
            route = route_topk(x, self.a[f"{site.name}.router.weight"], None, k,
                               self.aspec.normalize_topk and self.aspec.router_kind == "topk")
        ids, gates = route
        return y + lora_delta(x, A, B, ids, gates, scale)

    def _project(self, x, layer: int, stage: str, route, ffn_expert=None) -> list[torch.Tensor]:
        """The outputs of a stage's roles (families.STAGES), each projection adapted before it is split."""
        out: dict[str, torch.Tensor] = {}
        for proj in self.spec.arch.stage_projections(stage):
            y = self._adapted(x, layer, proj.name, route, ffn_expert)
            out.update(zip(proj.roles, torch.split(y, [self.spec.role_shape(r)[0] for r in proj.roles], dim=-1)))
        return [out[r] for r in STAGES[stage]]

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return spec_norm(self.spec, x, self.w[name])

    def _attention(self, x, layer, route, rope, cache: KVCache, past: int, batch: int, seq: int):
        s, arch = self.spec, self.spec.arch
        q, k, v = self._project(x, layer, "qkv", route)
        q = q.view(batch, seq, s.num_heads, s.head_dim)
        k = k.view(batch, seq, s.num_kv_heads, s.head_dim)
        if arch.qk_norm:
            q = self._norm(q, arch.qk_norm_weight(layer, "q"))
            k = self._norm(k, arch.qk_norm_weight(layer, "k"))
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(batch, seq, s.num_kv_heads, s.head_dim).transpose(1, 2)
        cos, sin = rope[s.layer_rope(layer)]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past:
            k = torch.cat([cache.keys[layer], k], dim=2)
            v = torch.cat([cache.values[layer], v], dim=2)
        cache.keys[layer], cache.values[layer] = k, v
        rep = s.num_heads // s.num_kv_heads
        k_, v_ = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = softcap((q @ k_.transpose(-1, -2)) * s.query_scale, s.attn_softcap)
        qpos = torch.arange(past, past + seq, device=x.device)[:, None]
        kpos = torch.arange(past + seq, device=x.device)[None, :]
        allowed = kpos <= qpos
        window = s.window(layer)
        if window is not None:
            allowed = allowed & (kpos > qpos - window)
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores.to(torch.float32), dim=-1).to(q.dtype)
        out = (probs @ v_).transpose(1, 2).reshape(batch * seq, s.num_heads * s.head_dim)
        return self._project(out, layer, "o", route)[0]

    def _mlp(self, x, layer, route):
        act = self.spec.hidden_act
        if self.use_adapters and self.aspec.expert_kind == "ffn":
            ids, gates = route_topk(x, self.a[f"layers.{layer}.mlp.router.weight"], None, self.aspec.top_k,
                                    self.aspec.normalize_topk)
            out = 0
            for j in range(ids.shape[1]):
                e = ids[:, j:j + 1]
                gate, up = self._project(x, layer, "gate_up", None, e)
                down = self._project(activation(act, gate) * up, layer, "down", None, e)[0]
                out = out + gates[:, j:j + 1].to(x.dtype) * down
            return out
        gate, up = self._project(x, layer, "gate_up", route)
        return self._project(activation(act, gate) * up, layer, "down", route)[0]

    # ---- forward ---------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                routes: tuple[torch.Tensor, torch.Tensor] | None = None) -> StepOutput:
        """input_ids [B, S] (positions continue the cache). routes: optional (ids, gates)
        [B, S, k] that replace the pre-gate's (runners feed routes they computed)."""
        if self.xlora is not None:
            return self.xlora.forward(self._pass, torch.as_tensor(input_ids, device=self.device), cache,
                                      self.spec.num_layers)
        return self._pass(input_ids, cache, routes)

    def _pass(self, input_ids: torch.Tensor, cache: KVCache | None = None,
              routes: tuple[torch.Tensor, torch.Tensor] | None = None) -> StepOutput:
        s, arch = self.spec, self.spec.arch
        input_ids = torch.as_tensor(input_ids, device=self.device)
        if input_ids.dim() != 2:
            raise AdafuseError(f"input ids must be [batch, seq], found shape {list(input_ids.shape)}")
        bad = (input_ids < 0) | (input_ids >= s.vocab_size)
        if bad.any():
            raise AdafuseError(f"token id {input_ids[bad][0].item()} is out of the vocabulary [0, {s.vocab_size})")
        batch, seq = input_ids.shape
        cache = cache or KVCache([None] * s.num_layers, [None] * s.num_layers)
        past = cache.length if cache.keys[0] is not None else 0
        positions = torch.arange(past, past + seq, device=self.device).expand(batch, seq)
        rope = {r: tuple(t[:, None] for t in r.cos_sin(positions, self.dtype))
                for r in {s.layer_rope(layer) for layer in range(s.num_layers)}}  # [B, 1, S, rotary_dim]
        h = embed_tokens(s, self.w[EMBED], input_ids).reshape(batch * seq, s.hidden_size)
        route = None
        if routes is not None:
            route = (routes[0].reshape(batch * seq, -1).long(), routes[1].reshape(batch * seq, -1).float())
        norms = arch.norms
        for layer in range(s.num_layers):
            x = self._norm(h, arch.norm_weight(layer, norms.attn_in))
            if layer == 0 and self.pregated and route is None and self.aspec.pregate_input == "attn_norm_0":
                route = self.pregate(x)
            a = self._attention(x, layer, route, rope, cache, past, batch, seq)
            h = h + (a if norms.attn_out is None else self._norm(a, arch.norm_weight(layer, norms.attn_out)))
            x = self._norm(h, arch.norm_weight(layer, norms.mlp_in))
            if layer == 0 and self.pregated and route is None and self.aspec.pregate_input == "mlp_norm_0":
                route = self.pregate(x)
            m = self._mlp(x, layer, route)
            h = h + (m if norms.mlp_out is None else self._norm(m, arch.norm_weight(layer, norms.mlp_out)))
        h = self._norm(h, FINAL_NORM)
        logits = softcap((h @ self.w[LM_HEAD].T).float(), s.final_softcap).reshape(batch, seq, s.vocab_size)
        ids = gates = None
        if self.pregated:
            ids, gates = route[0].reshape(batch, seq, -1), route[1].reshape(batch, seq, -1)
        return StepOutput(logits, cache, ids, gates, h.reshape(batch, seq, s.hidden_size))

    __call__ = forward

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, list[StepOutput]]:
        """Greedy decoding: (generated ids [B, max_new_tokens], step outputs: prefill then each decode)."""
        out = self.forward(prompt_ids)
        steps, tokens = [out], []
        for i in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
            if i + 1 == max_new_tokens:
                break
            out = self.forward(nxt, out.cache)
            steps.append(out)
        gen = torch.cat(tokens, dim=1) if tokens else torch.empty(prompt_ids.shape[0], 0, dtype=torch.int64)
        return gen, steps

