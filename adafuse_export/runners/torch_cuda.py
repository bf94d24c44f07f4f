"""GPU decoder for pre-gated checkpoints: routing table -> adapters -> dense backbone.

A static KV cache and device-side positions make every decode step the same sequence of
kernels, so it is captured once in a CUDA graph and replayed (at batch 1 the GPU otherwise
waits on kernel launches from the host). Adapter strategies:

  dense     no adapters (the base model: the speed floor)
  unmerged  y = W x + s * sum_k g_k B_k (A_k x) with plain PyTorch ops
  fused     the routed fused linear kernel (plugins/kernels): W x and the LoRA term in one pass
  switch    the fused switch kernel merges the token's experts into W in place (one launch for all
            layers, a no-op when the route is unchanged), then the dense backbone runs (batch 1)

Without the kernel library (CPU, tests) `fused` and `switch` run the same math with PyTorch
ops, so the decoding logic is tested everywhere and the kernels are tested on the GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checkpoint import Checkpoint
from ..errors import AdafuseError
from ..onnx.plugin_ops import check_expert_ids
from ..families import EMBED, FINAL_NORM, LM_HEAD, STAGES
from ..kernels.binding import decode_attention_supported
from ..reference.model import activation, apply_rope, embed_tokens, lora_delta, rms_norm, softcap
from ..spec import AdapterSpec, ModelSpec

STRATEGIES = ("dense", "unmerged", "fused", "switch")
# Above this many rows (prefill) the decoder runs cuBLAS plus the LoRA term in PyTorch ops: the kernel
# library's many-rows GEMM takes 1.8-4.5x cuBLAS's dense time alone (benchmarks/results/lora_many_rows.json).
FUSED_MAX_ROWS = 16


@dataclass
class SiteWeights:
    name: str
    W: torch.Tensor  # [out, in] live (merged in place under `switch`)
    bias: torch.Tensor | None
    A: torch.Tensor | None  # [E, r, in]
    B: torch.Tensor | None  # [E, out, r]
    scale: float
    W_base: torch.Tensor | None = None  # pristine copy for drift-free switching
    splits: list[int] | None = None  # output sizes of the roles it computes, in row order
    roles: tuple[str, ...] = ()  # those roles (families.STAGES)
    parts: list | None = None  # per-member row views for the switch (no block-diagonal zeros to merge)
    B_flat: torch.Tensor | None = None  # [E*r, out]: B laid out for the many-rows matmul, made on first use


class TorchOps:
    """The adapter math in PyTorch ops: the fallback and the definition the kernels must meet."""

    @staticmethod
    def linear(x, site: SiteWeights):
        """x W^T (+ bias): the projection without its adapter."""
        y = x @ site.W.T
        return y + site.bias if site.bias is not None else y

    @staticmethod
    def lora_linear(x, site: SiteWeights, ids, gates):
        assert site.A is not None and site.B is not None, f"{site.name} has no adapter"
        y = TorchOps.linear(x, site)
        if x.shape[0] <= FUSED_MAX_ROWS:
            return y + lora_delta(x, site.A, site.B, ids, gates, site.scale).to(y.dtype)
        # Many rows (prefill): gathering B per row would need rows*k*out*r elements; instead run
        # every expert's A densely, keep each row's k gated slices, and apply all B's in one matmul.
        E, r, _ = site.A.shape
        t = (x @ site.A.reshape(E * r, -1).T).view(-1, E, r).float()
        weights = torch.zeros(x.shape[0], E, device=x.device).scatter_add_(1, ids.long(), gates.float())
        z = (t * weights[..., None]).to(x.dtype).reshape(-1, E * r)
        if site.B_flat is None:  # a copy (B^T's expert and rank axes do not merge): made once, not per call
            site.B_flat = site.B.transpose(1, 2).reshape(E * r, -1)
        return y + (z @ site.B_flat) * site.scale

    def switch(self, sites: list[SiteWeights], new_ids, new_gates, old_ids, old_gates):
        """W = W_base + s sum_j g_j B_j A_j for the (single) new route; mirrors the kernel's pristine mode."""
        ids, gates = new_ids.reshape(-1).long(), new_gates.reshape(-1).float()
        for s in sites:
            assert s.A is not None and s.B is not None and s.W_base is not None, f"{s.name} is not a switch site"
            delta = torch.einsum("kor,kri->oi", s.B[ids].float() * gates[:, None, None], s.A[ids].float())
            s.W.copy_((s.W_base.float() + s.scale * delta).to(s.W.dtype))
        old_ids.copy_(new_ids.reshape(old_ids.shape))
        old_gates.copy_(new_gates.reshape(old_gates.shape))

    # ---- the work between the projections ----------------------------------------
    @staticmethod
    def add_norm(h, delta, w, eps: float, kind: str = "rms"):
        """(h + delta, the norm of kind `kind` of h + delta); delta None: (h, norm(h))."""
        if delta is None:
            return h, rms_norm(h, w, eps, kind)
        h = h + delta
        return h, rms_norm(h, w, eps, kind)

    @staticmethod
    def act_mul(act: str, g, u):
        return activation(act, g) * u

    @staticmethod
    def attention(q, k, v, cos, sin, positions, k_cache, v_cache, mask, m: ModelSpec, window: int | None):
        """Self-attention of one layer for q [B*S, H*D], k, v [B*S, KV*D] (projection outputs, q/k
        normed where the family says): RoPE, this step's keys/values written into the caches at
        `positions` [B, S], attention over the caches under `mask` (the layer's `window`) -> [B*S, H*D].
        cos, sin [B, 1, S, rotary_dim]."""
        batch, seq = positions.shape
        q = q.reshape(batch, seq, m.num_heads, m.head_dim).transpose(1, 2)
        k = k.reshape(batch, seq, m.num_kv_heads, m.head_dim).transpose(1, 2)
        v = v.reshape(batch, seq, m.num_kv_heads, m.head_dim).transpose(1, 2)
        q, k = _rope(q, k, cos, sin)
        # write this step's keys/values at their positions (device-side index: graph-safe)
        index = positions[0]
        k_cache[:batch].index_copy_(2, index, k)
        v_cache[:batch].index_copy_(2, index, v)
        return TorchOps._attend_cache(q, k_cache, v_cache, mask, m)

    @staticmethod
    def _attend_cache(q, k_cache, v_cache, mask, m: ModelSpec):
        """q [B, H, S, D] (roped) over the caches -> [B*S, H*D]."""
        batch, _, seq, _ = q.shape
        attn = _attention(q, k_cache[:batch], v_cache[:batch], mask, m.query_scale, m.attn_softcap,
                          m.num_heads != m.num_kv_heads)
        return attn.transpose(1, 2).reshape(batch * seq, m.num_heads * m.head_dim)


def _rope(q, k, cos, sin):
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def _attention(q, k, v, mask, scale: float, cap: float | None, gqa: bool):
    """softmax(cap(q k^T * scale) + mask) v; scaled_dot_product_attention has no soft-capping, so a capped
    family (Gemma 2) runs the same steps in plain ops."""
    if cap is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = softcap((q @ k.transpose(-1, -2)) * scale, cap) + mask
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


class KernelOps:
    """The same operations through the CUDA kernel library (adafuse_export.kernels), where a
    kernel computes the family's function (RMSNorm without the 1+w offset, SiLU, full-width RoPE,
    no attention soft-capping), else the PyTorch definitions. With step_kernels=False the work
    between the projections stays in PyTorch ops (for A/B timing)."""

    def __init__(self, kernels, step_kernels: bool = True, dense_gemv: bool = False):
        self.k = kernels
        self.step_kernels = step_kernels
        self.dense_gemv = dense_gemv  # projections without adapter: the library's GEMV instead of cuBLAS
        self._tables: dict[tuple, tuple] = {}
        self._workspaces: dict[tuple, torch.Tensor] = {}

    def add_norm(self, h, delta, w, eps: float, kind: str = "rms"):
        if not self.step_kernels or kind != "rms":  # the kernel computes Llama's norm only
            return TorchOps.add_norm(h, delta, w, eps, kind)
        return h, self.k.add_rms_norm(h, delta, w, eps)  # h += delta in place

    def act_mul(self, act: str, g, u):
        if not self.step_kernels or act != "silu" or g.stride() != u.stride() or g.stride(1) != 1:
            return TorchOps.act_mul(act, g, u)
        return self.k.silu_mul(g, u)

    def attention(self, q, k, v, cos, sin, positions, k_cache, v_cache, mask, m: ModelSpec, window: int | None):
        if (not self.step_kernels or m.rotary_dim != m.head_dim or m.attn_softcap is not None
                or any(t.stride(1) != 1 for t in (q, k, v))):
            return TorchOps.attention(q, k, v, cos, sin, positions, k_cache, v_cache, mask, m, window)
        batch, seq = positions.shape
        tokens, D = q.shape[0], m.head_dim
        pos = positions.reshape(-1)
        q = self.k.rope_kv_write(q, k, v, cos.reshape(tokens, D), sin.reshape(tokens, D), pos, k_cache, v_cache,
                                 seq=seq, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads)
        if seq == 1 and decode_attention_supported(q.dtype, m.num_heads, m.num_kv_heads, D):
            return self.k.decode_attention(q, k_cache, v_cache, pos, num_heads=m.num_heads, window=window or 0,
                                           scale=m.query_scale)
        return TorchOps._attend_cache(q.view(batch, seq, m.num_heads, D).transpose(1, 2), k_cache, v_cache, mask, m)

    def linear(self, x, site: SiteWeights):
        # one row only: at 2-16 rows the library's tensor-core GEMV is slower than cuBLAS
        # (benchmarks/results/gemv_sites.json)
        if not self.dense_gemv or x.shape[0] != 1:
            return TorchOps.linear(x, site)
        return self.k.linear(x.contiguous(), site.W, bias=site.bias)

    def lora_linear(self, x, site: SiteWeights, ids, gates):
        return self.k.lora_linear(x.contiguous(), site.W, site.A, site.B, ids, gates, site.scale, bias=site.bias,
                                  workspace=self._workspace(site, x.shape[0], ids.shape[-1]), exclusive_workspace=True)

    def _workspace(self, site: SiteWeights, rows: int, top_k: int):
        """One workspace per (site, rows), kept for the decoder's life, hence exclusive (lora_linear's
        exclusive_workspace): under programmatic dependent launch the one-row shrink then writes its
        flag before the previous kernel has completed, which a workspace allocated per call must not
        allow (it could be a block the caching allocator just took back from another site's call)."""
        assert site.A is not None
        E, rank, in_f = site.A.shape
        # every size the workspace depends on is in the key: a later decoder sharing these ops can get a
        # weight at a freed weight's address, with other shapes (seen: 784 bytes kept where 1296 were needed)
        key = (site.W.data_ptr(), rows, top_k, in_f, site.W.shape[0], E, rank)
        ws = self._workspaces.get(key)
        if ws is None:
            need = self.k.lora_linear_workspace_size(rows, in_f, site.W.shape[0], E, rank, top_k)
            ws = self._workspaces[key] = torch.empty(need, dtype=torch.uint8, device=site.W.device)
        return ws

    def switch(self, sites: list[SiteWeights], new_ids, new_gates, old_ids, old_gates):
        # The device site table is built once per set of buffers; every pointer is in the key, since
        # freed buffers' addresses are reused by later allocations.
        key = tuple((s.W.data_ptr(), s.W_base.data_ptr() if s.W_base is not None else 0, _ptr(s.A), _ptr(s.B), s.scale)
                    for s in sites)
        if key not in self._tables:
            table = self.k.sites_to_device([{"W": s.W, "W_base": s.W_base, "A": s.A, "B": s.B, "scale": s.scale}
                                            for s in sites])
            self._tables[key] = (table, max(s.W.shape[0] for s in sites), max(s.W.shape[1] for s in sites))
        table, max_out, max_in = self._tables[key]
        self.k.switch(sites[0].W.dtype, table, len(sites), max_out, max_in, new_ids.reshape(-1),
                      new_gates.reshape(-1), old_ids, old_gates)


def capture_graph(fn, warmups: int = 1):
    """fn() run `warmups` times on a side stream (allocator, cuBLAS handles, per-device setup: none of it may
    happen during capture), then captured in a CUDA graph: (graph, what the captured call returned)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _ptr(t: torch.Tensor | None) -> int:
    assert t is not None, "switch sites have adapters"
    return t.data_ptr()


class GpuDecoder:
    def __init__(self, model: ModelSpec, adapter: AdapterSpec | None, weights: dict[str, torch.Tensor],
                 routes: tuple[torch.Tensor, torch.Tensor] | None, *, strategy: str = "fused",
                 max_batch: int = 1, max_seq: int = 1024, ops=None, fuse_projections: bool = True):
        if strategy not in STRATEGIES:
            raise AdafuseError(f"--strategy '{strategy}' is unknown (expected one of {', '.join(STRATEGIES)})")
        if strategy != "dense" and (adapter is None or routes is None):
            raise AdafuseError("the GPU decoder needs a pre-gated checkpoint with an exact routing table")
        if strategy == "switch" and max_batch != 1:
            raise AdafuseError(f"strategy 'switch' merges one route into the weights, so it needs batch 1, found max batch {max_batch}")
        self.m, self.a, self.strategy = model, adapter, strategy
        self.max_batch, self.max_seq = max_batch, max_seq
        self.ops = ops or TorchOps()
        any_w = next(iter(weights.values()))
        self.device, self.dtype = any_w.device, any_w.dtype
        self.w = weights
        if model.tie_word_embeddings:
            self.w[LM_HEAD] = self.w[EMBED]
        if routes is not None and adapter is not None:  # the kernels read A[id], B[id] unchecked
            check_expert_ids(routes[0].cpu().numpy(), adapter.num_experts, "routing table 'expert_ids'")
        self.route_ids: torch.Tensor | None
        self.route_gates: torch.Tensor | None
        self.route_ids, self.route_gates = (routes[0].to(self.device, torch.int32).contiguous(),
                                            routes[1].to(self.device, torch.float32).contiguous()) if routes else (None, None)
        # Projections reading the same input (a stage) share one GEMV and one LoRA shrink when fused;
        # a family's own fused projections (Phi-3's qkv_proj) are one group either way.
        self.stage_groups: dict[str, list[str]] = {}
        groups: dict[str, tuple[str, ...]] = {}
        for stage in STAGES:
            members = tuple(p.name for p in model.arch.stage_projections(stage))
            parts = {stage: members} if fuse_projections else {name: (name,) for name in members}
            groups.update(parts)
            self.stage_groups[stage] = list(parts)
        self.sites: dict[tuple[int, str], SiteWeights] = {}
        for layer in range(model.num_layers):
            for group, members in groups.items():
                self.sites[(layer, group)] = self._group_site(layer, group, members)
        self.switch_sites = [p for s in self.sites.values() if s.parts for p in s.parts]
        kv_shape = (max_batch, model.num_kv_heads, max_seq, model.head_dim)
        self.k_cache = [torch.zeros(kv_shape, device=self.device, dtype=self.dtype) for _ in range(model.num_layers)]
        self.v_cache = [torch.zeros(kv_shape, device=self.device, dtype=self.dtype) for _ in range(model.num_layers)]
        k = adapter.top_k if adapter else 1
        self.old_ids = torch.full((k,), -1, device=self.device, dtype=torch.int32)
        self.old_gates = torch.zeros((k,), device=self.device, dtype=torch.float32)
        self.length = 0
        self._graph: torch.cuda.CUDAGraph | None = None

    def _group_site(self, layer: int, group: str, members: tuple[str, ...]) -> SiteWeights:
        """Projections that read the same input as one site: W, bias and A stacked along the output
        (rank) axis, B block-diagonal with each member's scale folded in (scale 1). One GEMV and one
        LoRA shrink then serve q/k/v (or gate/up); the off-diagonal zeros of B add k*r*(out) bytes."""
        w, a = self.w, self.a
        weights: list[torch.Tensor] = []
        biases: list[torch.Tensor | None] = []
        As: list[torch.Tensor | None] = []
        Bs: list[torch.Tensor | int] = []  # a routed member's scaled B, else its output size
        for mod in members:
            p = self.m.arch.weight_prefix(layer, mod)
            weights.append(w[f"{p}.weight"])
            out = weights[-1].shape[0]
            biases.append(w.get(f"{p}.bias"))
            name = f"layers.{layer}.{mod}"
            if a is not None and self.strategy != "dense" and mod in a.static_modules:
                # a static LoRA (one always-on expert, no route) merged into the weight in float32, as the
                # ONNX export and the native artifact merge it (weights.base_weight)
                delta = w[f"{name}.lora_B"][0].float() @ w[f"{name}.lora_A"][0].float()
                weights[-1] = (weights[-1].float() + a.site_scale(name) * delta).to(self.dtype)
            if a is not None and self.strategy != "dense" and mod in a.target_modules:
                As.append(w[f"{name}.lora_A"])
                Bs.append((w[f"{name}.lora_B"].float() * a.site_scale(name)).to(self.dtype))
            else:
                As.append(None)
                Bs.append(out)
        W = weights[0] if len(members) == 1 else torch.cat(weights)
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else W.new_zeros(wt.shape[0]) for b, wt in zip(biases, weights)])
        A = B = None
        ranks = [x.shape[1] for x in As if x is not None]
        if ranks:
            A = torch.cat([x for x in As if x is not None], dim=1)
            experts = A.shape[0]
            B = W.new_zeros(experts, W.shape[0], sum(ranks))
            row = col = 0
            for x, b in zip(As, Bs):
                rows = b if isinstance(b, int) else b.shape[1]
                if x is not None:
                    B[:, row:row + rows, col:col + x.shape[1]] = b
                    col += x.shape[1]
                row += rows
        site = SiteWeights(f"layers.{layer}.{group}", W, bias, A, B, 1.0)
        site.roles = tuple(r for mod in members for r in self.m.arch.projection(mod).roles)
        site.splits = [self.m.role_shape(r)[0] for r in site.roles]
        if A is not None and self.strategy == "switch":
            # merge into a private copy: the given W may share memory with the checkpoint (CPU mmap)
            site.W_base, site.W = site.W, site.W.clone()
            site.parts, row = [], 0
            for mod, x, b, rows in zip(members, As, Bs, [wt.shape[0] for wt in weights]):
                if x is not None:
                    assert isinstance(b, torch.Tensor)
                    site.parts.append(SiteWeights(f"layers.{layer}.{mod}", site.W[row:row + rows], None, x, b, 1.0,
                                                  site.W_base[row:row + rows]))
                row += rows
        return site

    def _project(self, x, layer: int, stage: str, ids, gates) -> list:
        """Outputs of a stage's roles (families.STAGES: they read the same x), one GEMV per group."""
        out: dict[str, torch.Tensor] = {}
        for group in self.stage_groups[stage]:
            site = self.sites[(layer, group)]
            y = self._linear(x, layer, group, ids, gates)
            assert site.splits is not None
            out.update(zip(site.roles, torch.split(y, site.splits, dim=-1) if len(site.roles) > 1 else [y]))
        return [out[r] for r in STAGES[stage]]

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, device="cuda", dtype=torch.bfloat16, **kw) -> "GpuDecoder":
        from ..reference import ReferenceModel

        ref = ReferenceModel(ckpt, dtype=torch.float32)
        routes = ref.routing_table()
        weights = {n: t.to(device=device, dtype=dtype).contiguous() for n, t in {**ref.w, **ref.a}.items()
                   if n != LM_HEAD or not ckpt.model.tie_word_embeddings}
        return cls(ckpt.model, ckpt.adapter, weights, routes, **kw)

    # ---- one step ------------------------------------------------------------
    def _linear(self, x, layer, group, ids, gates):
        site = self.sites[(layer, group)]
        if site.A is None or self.strategy in ("dense", "switch"):
            return self.ops.linear(x, site)
        if self.strategy == "unmerged" or x.shape[0] > FUSED_MAX_ROWS:
            return TorchOps.lora_linear(x, site, ids, gates)
        return self.ops.lora_linear(x, site, ids, gates)

    def _step(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [B, S] on the device -> logits [B, S, vocab] float32."""
        m = self.m
        batch, seq = input_ids.shape
        ids = gates = None
        if self.route_ids is not None and self.route_gates is not None and self.strategy != "dense":
            ids = self.route_ids[input_ids.reshape(-1)]
            gates = self.route_gates[input_ids.reshape(-1)]
            if self.strategy == "switch":
                self.ops.switch(self.switch_sites, ids, gates, self.old_ids, self.old_gates)
        rope = {r: tuple(t[:, None] for t in r.cos_sin(positions, self.dtype))
                for r in {m.layer_rope(layer) for layer in range(m.num_layers)}}
        kpos = torch.arange(self.max_seq, device=self.device)
        masks = {}
        for window in {m.window(layer) for layer in range(m.num_layers)}:
            allowed = kpos[None, None, :] <= positions[:, :, None]  # [B, S, max_seq]
            if window is not None:
                allowed = allowed & (kpos[None, None, :] > positions[:, :, None] - window)
            masks[window] = torch.zeros(allowed.shape, device=self.device, dtype=self.dtype).masked_fill(
                ~allowed, float("-inf"))[:, None]
        h = embed_tokens(m, self.w[EMBED], input_ids).reshape(batch * seq, m.hidden_size)
        eps, norm, arch, ops = m.rms_norm_eps, m.arch.norm, m.arch, self.ops
        norms = arch.norms

        def post_norm(t, layer, name):  # Gemma's norm of a block's output before the residual add
            return t if name is None else rms_norm(t, self.w[arch.norm_weight(layer, name)], eps, norm)

        delta = None  # the previous layer's MLP output, added to h together with the next norm
        for layer in range(m.num_layers):
            h, x = ops.add_norm(h, delta, self.w[arch.norm_weight(layer, norms.attn_in)], eps, norm)
            q, k, v = self._project(x, layer, "qkv", ids, gates)
            if arch.qk_norm:  # per head, before RoPE
                q = rms_norm(q.reshape(batch * seq, m.num_heads, m.head_dim), self.w[arch.qk_norm_weight(layer, "q")],
                             eps, norm).reshape(batch * seq, -1)
                k = rms_norm(k.reshape(batch * seq, m.num_kv_heads, m.head_dim), self.w[arch.qk_norm_weight(layer, "k")],
                             eps, norm).reshape(batch * seq, -1)
            window = m.window(layer)
            cos, sin = rope[m.layer_rope(layer)]
            attn = ops.attention(q, k, v, cos, sin, positions, self.k_cache[layer], self.v_cache[layer], masks[window],
                                 m, window)
            o = post_norm(self._project(attn, layer, "o", ids, gates)[0], layer, norms.attn_out)
            h, x = ops.add_norm(h, o, self.w[arch.norm_weight(layer, norms.mlp_in)], eps, norm)
            act = ops.act_mul(m.hidden_act, *self._project(x, layer, "gate_up", ids, gates))
            delta = post_norm(self._project(act, layer, "down", ids, gates)[0], layer, norms.mlp_out)
        _, x = ops.add_norm(h, delta, self.w[FINAL_NORM], eps, norm)
        return softcap((x @ self.w[LM_HEAD].T).float(), m.final_softcap).reshape(batch, seq, m.vocab_size)

    # ---- public --------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        input_ids = input_ids.to(self.device)
        batch, seq = input_ids.shape
        if batch > self.max_batch or seq > self.max_seq:
            raise AdafuseError(f"prompt of shape {list(input_ids.shape)} exceeds max batch {self.max_batch} / max seq {self.max_seq}")
        self.batch = batch
        positions = torch.arange(seq, device=self.device).expand(batch, seq)
        self.old_ids.fill_(-1)
        if self.strategy == "switch":
            # Prefill carries many routes: run it unmerged on pristine weights, merge from the first decode step.
            saved, self.strategy = self.strategy, "unmerged"
            for s in self.sites.values():
                if s.W_base is not None:
                    s.W.copy_(s.W_base)
            try:
                logits = self._step(input_ids, positions)
            finally:
                self.strategy = saved
        else:
            logits = self._step(input_ids, positions)
        self.length = seq
        self._graph = None
        return logits

    @torch.no_grad()
    def decode(self, next_ids: torch.Tensor, use_graph: bool = True) -> torch.Tensor:
        """One token per row: next_ids [B, 1] -> logits [B, 1, vocab]."""
        if self.length >= self.max_seq:
            raise AdafuseError(f"sequence length {self.length + 1} exceeds max seq {self.max_seq}")
        if not use_graph or self.device.type != "cuda":
            positions = torch.full((self.batch, 1), self.length, device=self.device, dtype=torch.int64)
            out = self._step(next_ids.to(self.device), positions)
            self.length += 1
            return out
        if self._graph is None:
            self._static_ids = torch.zeros((self.batch, 1), device=self.device, dtype=torch.int64)
            self._static_pos = torch.zeros((self.batch, 1), device=self.device, dtype=torch.int64)
            self._static_ids.copy_(next_ids)
            self._static_pos.fill_(self.length)
            self._graph, self._static_out = capture_graph(lambda: self._step(self._static_ids, self._static_pos))
        self._static_ids.copy_(next_ids)
        self._static_pos.fill_(self.length)
        self._graph.replay()
        self.length += 1
        return self._static_out

    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, use_graph: bool = True) -> torch.Tensor:
        logits = self.prefill(prompt_ids)
        tokens = []
        for i in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
            if i + 1 < max_new_tokens:
                logits = self.decode(nxt, use_graph)
        return torch.cat(tokens, 1) if tokens else torch.empty(prompt_ids.shape[0], 0, dtype=torch.int64)


def choose_strategy(make, candidates=("fused", "switch"), tokens: list[int] | None = None, steps: int = 8) -> tuple[str, dict]:
    """`auto`: build a decoder per candidate with make(strategy), time CUDA-graph decode steps on
    tokens whose routes change every step, keep the fastest. Returns (strategy, ms per step)."""
    import statistics

    timings = {}
    for strategy in candidates:
        dec = make(strategy)
        dec.prefill(torch.tensor([[1, 2, 3, 4]], device=dec.device))
        feed = tokens or list(range(5, 5 + steps + 2))
        times = []
        for i, tok in enumerate(feed):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dec.decode(torch.tensor([[tok]], device=dec.device))
            end.record()
            end.synchronize()
            if i >= 2:  # the first steps capture the graph
                times.append(start.elapsed_time(end))
        timings[strategy] = statistics.median(times)
        del dec
    return min(timings, key=timings.__getitem__), timings


def weight_bytes(decoder: GpuDecoder) -> int:
    """Bytes one decode step must read at least: every projection and the LM head once."""
    mats = [s.W for s in decoder.sites.values()] + [decoder.w[LM_HEAD]]
    return sum(t.numel() * t.element_size() for t in mats)
