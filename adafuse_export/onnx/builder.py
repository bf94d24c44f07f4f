"""ONNX graphs built directly from the canonical checkpoint (no tracing).

Mirrors adafuse_export/reference/model.py op by op, so the reference is the spec:
  decoder  input_ids, past_lengths, seq_lens, [expert_ids, gates], past_key_values.{l}.key/value
           -> logits, present.{l}.key/value[, expert_ids, gates]   (contract.py: one length per row)
  pregate  input_ids -> expert_ids, gates        (pre-gate reading RMSNorm_0(embed) only)
See docs/onnx-graphs.md for the contract.

Hidden states are kept flat, [N = batch*seq, hidden], so every projection is one Gemm
(transB=1 over the [out, in] weight) or one AdafuseLoraLinear node.
"""
from __future__ import annotations


import numpy as np
from onnx import TensorProto

from ..checkpoint import Checkpoint
from ..errors import AdafuseError
from ..families import EMBED, FINAL_NORM, LM_HEAD, STAGES, features
from ..summary import adapter_summary, routing_metadata
from ..weights import WEIGHT_FORMATS as WEIGHTS, base_weight, read_released, rounded
from . import contract, plugin_ops
from .graph import ELEM, FP8, FP8_OPSET, KV_IN_PLACE_OPSET, Deferred, Graph, torch_dtype
from .graph_xp import GraphNamespace

FLAVOURS = ("portable", "plugin")
# How the decoder writes present.{l}: "copy" (Where over the whole cache, a new tensor), or "in-place" (TensorScatter of
# the step's rows into the past, for TensorRT >= 10.15, whose parser maps it onto IKVCacheUpdateLayer: present shares
# the past's memory; the cache axis is static, cache_len positions). runtime/README.md "The KV cache".
KV_UPDATES = ("copy", "in-place")
DTYPES = ("float32", "float16", "bfloat16")
F32, I64, I32, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL


def check_kv_update(kv_update: str, flavour: str, cache_len: int | None) -> int | None:
    """The cache's static length of an in-place graph (None for copy); refuses what cannot build it."""
    if kv_update not in KV_UPDATES:
        raise AdafuseError(f"--kv-update '{kv_update}' is unknown (expected one of {', '.join(KV_UPDATES)})")
    if kv_update == "copy":
        if cache_len is not None:
            raise AdafuseError(f"--max-seq {cache_len}: a static cache length is only for --kv-update in-place "
                               "(the copy form's cache axis is dynamic)")
        return None
    if flavour != "plugin":
        raise AdafuseError(f"--kv-update in-place: only the plugin flavour (full TensorRT >= 10.15) updates the cache in "
                           f"place; found flavour '{flavour}'")
    if isinstance(cache_len, bool) or not isinstance(cache_len, int) or cache_len < 2:
        raise AdafuseError(f"--kv-update in-place needs the cache's static length (--max-seq) >= 2, found {cache_len}")
    return cache_len


def pregate_in_decoder(ckpt: Checkpoint) -> bool:
    """Pre-gate computed inside the decoder (its input comes after layer 0's attention)."""
    a = ckpt.adapter
    return a.routing == "pregate" and a.pregate_input == "mlp_norm_0"


def has_pregate_graph(ckpt: Checkpoint) -> bool:
    return ckpt.adapter.routing_table_exact


def metadata(ckpt: Checkpoint, graph: str, flavour: str, dtype: str, weights: str = "dtype") -> dict[str, str]:
    m = ckpt.model
    return {
        "adafuse.format": f"adafuse-onnx/{contract.VERSION}", "adafuse.graph": graph, "adafuse.flavour": flavour,
        "adafuse.dtype": dtype, "adafuse.weights": WEIGHTS[weights], "adafuse.checkpoint_sha256": ckpt.index_sha256(),
        "adafuse.family": m.family, "adafuse.vocab_size": str(m.vocab_size), "adafuse.hidden_size": str(m.hidden_size),
        "adafuse.num_layers": str(m.num_layers), "adafuse.num_kv_heads": str(m.num_kv_heads),
        "adafuse.head_dim": str(m.head_dim), **routing_metadata(adapter_summary(ckpt.adapter)),
        "adafuse.sliding_window": str(m.sliding_window),
    }


class _Builder:
    def __init__(self, ckpt: Checkpoint, flavour: str, dtype: str, name: str, strategy: str | None = None,
                 weights: str = "dtype", quantize_from: str | None = None, kv_update: str = "copy",
                 cache_len: int | None = None):
        if flavour not in FLAVOURS:
            raise AdafuseError(f"--flavour '{flavour}' is unknown (expected one of {', '.join(FLAVOURS)})")
        self.kv_update, self.cache_len = kv_update, check_kv_update(kv_update, flavour, cache_len)
        if strategy is not None and flavour != "plugin":
            raise AdafuseError(f"--strategy {strategy}: only the plugin flavour has plugin nodes to choose "
                               f"(export-onnx --flavour plugin, convert --backend tensorrt); found flavour '{flavour}'")
        self.strategy = strategy or plugin_ops.DEFAULT_STRATEGY
        plugin_ops.op_type(self.strategy)  # an unknown strategy fails before any weight is read
        if dtype not in DTYPES:
            raise AdafuseError(f"--dtype '{dtype}' is unknown (expected one of {', '.join(DTYPES)})")
        self.ckpt, self.spec, self.aspec = ckpt, ckpt.model, ckpt.adapter
        self.flavour, self.dtype = flavour, dtype
        self.tdtype = torch_dtype(dtype)
        self.g = Graph(name, dtype)
        self.xp = GraphNamespace(self.g)  # features.py's definitions, emitted as nodes of this graph
        self.elem = ELEM[dtype]
        self.sites = {(s.layer, s.module): s for s in ckpt.sites()}
        self._weights: dict[str, str] = {}
        if weights not in WEIGHTS:
            raise AdafuseError(f"--weights '{weights}' is unknown (expected one of {', '.join(WEIGHTS)})")
        self.weights = weights
        # FP8: each projection's weight as rounded to this dtype is quantized (a float32 twin of a bfloat16 graph,
        # validated where ONNX Runtime has no bfloat16 kernels, quantizes the bfloat16 weights: the same bytes)
        self.quantize_from = torch_dtype(quantize_from or dtype)
        if weights == "fp8":
            from ..native_artifact import check_weight_dtype, check_weight_format

            # 16-bit weights to quantize; the plugin's kernels also need in_features % 16 == 0 (as the native backend's)
            (check_weight_format if flavour == "plugin" else lambda c, *a: check_weight_dtype(*a))(
                ckpt, quantize_from or dtype, weights)
            self.g.opset = FP8_OPSET
            if self.strategy == "switch" and flavour == "plugin":
                raise AdafuseError("--weights fp8 --strategy switch: the AdafuseSwitchLinear plugin takes W in the model "
                                   "dtype only (it has no FP8 weight_scale input); use --strategy fused, or the native "
                                   "backend (--backend native), whose switch strategy runs FP8 weights")
        if kv_update == "in-place":
            self.g.opset = KV_IN_PLACE_OPSET  # TensorScatter (FP8's DequantizeLinear takes the same form there)

    # ---- weights ---------------------------------------------------------------------
    # Each weight is a Deferred: shape from the checkpoint header, bytes read only when the exporter
    # materialises it (inline or streamed to external data), one tensor at a time.
    def _read(self, src, name: str):
        return read_released(src, name)

    def _rounded(self, src, name: str):
        """The tensor as the reference holds it (cast to the model dtype), in float32."""
        return rounded(src, name, self.tdtype)

    def _deferred(self, src, name: str, produce, elem=None) -> Deferred:
        return Deferred(self.elem if elem is None else elem, tuple(src.info(name).shape), produce)

    def weight(self, name: str, merge_site=None) -> str:
        """A base weight initializer in the model dtype; static LoRA merged in float32 when given."""
        if name in self._weights:
            return self._weights[name]
        if name == LM_HEAD and self.spec.tie_word_embeddings:
            self._weights[name] = self.weight(EMBED)
            return self._weights[name]
        base = self.ckpt.base

        def produce(site=merge_site):
            return base_weight(self.ckpt, name, self.tdtype, site)
        self._weights[name] = self.g.init(name, self._deferred(base, name, produce))
        return self._weights[name]

    def fp8_weight(self, name: str, merge_site=None) -> tuple[str, str]:
        """A projection weight as FP8 initializers: (q [out, in] float8e4m3fn, q's name + '_scale' [out] float32),
        quantize.quantize_fp8_per_channel of the weight as the reference holds it (static LoRA merged), the
        per-row quantization of the native artifact's stacked stage matrices row for row."""
        if name + "#fp8" in self._weights:
            return self._weights[name + "#fp8"], self._weights[name + "#fp8_scale"]
        from ..quantize import quantize_fp8_per_channel

        base = self.ckpt.base
        cache: list = []  # (q, scale) between writing q and its scale, which follow each other: one quantization

        def part(i: int):
            if not cache:
                cache.append(quantize_fp8_per_channel(base_weight(self.ckpt, name, self.quantize_from, merge_site), name))
            out = cache[0][i]
            if i == 1:
                cache.clear()
            return out
        out_features = base.info(name).shape[0]
        q = self.g.init(name, self._deferred(base, name, lambda: part(0), FP8))
        scale = self.g.init(f"{name}_scale", Deferred(F32, (out_features,), lambda: part(1)))
        self._weights[name + "#fp8"], self._weights[name + "#fp8_scale"] = q, scale
        return q, scale

    def projection_weight(self, name: str, merge_site=None) -> str:
        """The weight a Gemm (or a dtype-weights plugin node) reads: the base weight, or with FP8 weights its
        DequantizeLinear along the output channels (axis 0) in float32, cast to the model dtype."""
        if self.weights != "fp8":
            return self.weight(name, merge_site)
        if name + "#dq" not in self._weights:
            g = self.g
            deq = g.op("DequantizeLinear", list(self.fp8_weight(name, merge_site)), axis=0, hint=f"{name}.dequantize")
            self._weights[name + "#dq"] = g.cast(deq, self.elem, F32)
        return self._weights[name + "#dq"]

    def adapter_weight(self, name: str) -> str:
        if name not in self._weights:
            src = self.ckpt.adapters
            self._weights[name] = self.g.init(name, self._deferred(src, name, lambda: self._read(src, name).to(self.tdtype)))
        return self._weights[name]

    def router_weight(self, name: str) -> str:
        """Routers run in float32 on dtype-rounded weights, as in the reference."""
        if name not in self._weights:
            src = self.ckpt.adapters
            self._weights[name] = self.g.init(name, self._deferred(src, name, lambda: self._rounded(src, name), F32))
        return self._weights[name]

    # ---- building blocks ---------------------------------------------------------------
    def rms_norm(self, x: str, weight_name: str) -> str:
        """The family's RMSNorm over the last axis (features.rms_norm)."""
        xp = self.xp
        return features.rms_norm(xp, xp.value(x, self.elem), xp.value(self.weight(weight_name), self.elem),
                                 self.spec.rms_norm_eps, self.spec.arch.norm).name

    def route(self, x: str, weight: str, bias: str | None, k: int, normalize: bool) -> tuple[str, str]:
        """Softmax router in float32 -> (ids [N, k] int32, gates [N, k] float32)."""
        g = self.g
        logits = g.op("Gemm", [g.cast(x, F32, self.elem), weight] + ([bias] if bias else []), transB=1, hint="router")
        probs = g.op("Softmax", [logits], axis=-1)
        gates, ids = g.op("TopK", [probs, g.const([k])], n_out=2, axis=-1, largest=1, sorted=1)
        if normalize:
            gates = g.op("Div", [gates, g.op("ReduceSum", [gates, g.const([-1])], keepdims=1)])
        return g.op("Cast", [ids], to=I32), gates

    def lora_delta(self, x: str, A: str, B: str, ids: str, gates: str | None, scale: float) -> str:
        """scale * sum_j gates[n,j] B[ids[n,j]] A[ids[n,j]] x[n] in standard ops (gates None: all 1)."""
        g = self.g
        t = g.op("MatMul", [g.op("Gather", [A, ids], axis=0), g.op("Unsqueeze", [x, g.const([1, 3])])])  # [N,k,r,1]
        if gates is not None:
            gd = g.cast(gates, self.elem, F32)
            t = g.op("Mul", [t, g.op("Unsqueeze", [gd, g.const([2, 3])])])
        u = g.op("MatMul", [g.op("Gather", [B, ids], axis=0), t])  # [N,k,out,1]
        s = g.op("ReduceSum", [u, g.const([1, 3])], keepdims=0)  # [N,out]
        return g.op("Mul", [s, g.const_of(scale, self.dtype)], hint="lora_delta")

    def linear(self, x: str, layer: int, module: str, route=None, ffn_slot: str | None = None) -> str:
        """One projection with its adapter; x [N, in] -> [N, out].

        route: (ids, gates) [N, k] for routed linear sites; ffn_slot: ids [N, 1] of a MixLoRA expert.
        """
        g = self.g
        p = self.spec.arch.weight_prefix(layer, module)
        site = self.sites.get((layer, module))
        static = site is not None and site.static
        bias = [self.weight(f"{p}.bias")] if module in self.spec.bias_modules else []
        if site is None or static:
            W = self.projection_weight(f"{p}.weight", merge_site=site if static else None)
            return g.memo((x, p), lambda: g.op("Gemm", [x, W] + bias, transB=1, hint=f"{p}"))
        A, B = self.adapter_weight(f"{site.name}.lora_A"), self.adapter_weight(f"{site.name}.lora_B")
        scale = self.aspec.site_scale(site.name)
        if ffn_slot is not None:
            ids, gates = ffn_slot, None
        elif self.aspec.routing == "layerwise":
            dense = self.aspec.router_kind == "dense"
            k = self.aspec.experts_in_layer(layer) if dense else self.aspec.top_k
            ids, gates = self.route(x, self.router_weight(f"{site.name}.router.weight"), None, k,
                                    self.aspec.normalize_topk and not dense)
        else:
            ids, gates = route
        if self.flavour == "plugin":
            e, r, inp = self.ckpt.adapters.info(f"{site.name}.lora_A").shape
            out = self.spec.linear_shape(module)[0]
            top_k = 1 if ffn_slot is not None else (e if self.aspec.routing == "layerwise" and self.aspec.router_kind == "dense" else self.aspec.top_k)
            plugin_ops.check_limits(f"{self.ckpt.path}: adapter site {site.name}", num_experts=e, rank=r)
            if gates is None:
                gates = g.op("Expand", [g.const([[1.0]], np.float32), g.op("Shape", [ids])], hint="ones")
            rest = None
            if top_k > plugin_ops.MAX_TOP_K:
                # The kernels mix at most MAX_TOP_K experts per row (e.g. LoRAMoE's dense router over more):
                # the node takes the first MAX_TOP_K, standard ops add the others. A sum, so exact.
                def cols(t: str, lo: int, hi: int) -> str:
                    return g.op("Slice", [t, g.const([lo]), g.const([hi]), g.const([1])])

                rest = self.lora_delta(x, A, B, cols(ids, plugin_ops.MAX_TOP_K, top_k),
                                       cols(gates, plugin_ops.MAX_TOP_K, top_k), scale)
                ids, gates = cols(ids, 0, plugin_ops.MAX_TOP_K), cols(gates, 0, plugin_ops.MAX_TOP_K)
                top_k = plugin_ops.MAX_TOP_K
            op = plugin_ops.op_type(self.strategy)
            name = f"/{site.name}/{op}"  # MixLoRA has one node per slot: names must stay unique
            if self.weights == "fp8":
                # The plugin takes the FP8 initializer and its scales as inputs and runs the kernels' FP8 path. Fed a
                # DequantizeLinear instead, TensorRT would fold it into a constant in the model dtype: the engine
                # would then hold and read 16-bit weights, twice the bytes of the decode step's weight read.
                W, w_scale = self.fp8_weight(f"{p}.weight")
                extra = [w_scale]
            else:
                W, extra = self.weight(f"{p}.weight"), []
            node = plugin_ops.make_node([x, W, A, B, ids, gates] + bias + extra, g.fresh(f"{site.name}.y"),
                                        name if ffn_slot is None else g.fresh(name),
                                        in_features=inp, out_features=out, num_experts=e, rank=r, top_k=top_k,
                                        scale=scale, has_bias=bool(bias), strategy=self.strategy,
                                        weight_dtype=plugin_ops.WEIGHT_DTYPES[WEIGHTS[self.weights]])
            y = g.add_node(node)
            return y if rest is None else g.op("Add", [y, rest])
        W = self.projection_weight(f"{p}.weight")
        base = g.memo((x, p), lambda: g.op("Gemm", [x, W] + bias, transB=1, hint=f"{p}"))
        return g.op("Add", [base, self.lora_delta(x, A, B, ids, gates, scale)])

    def project(self, x: str, layer: int, stage: str, route=None, ffn_slot: str | None = None) -> list[str]:
        """The outputs of a stage's roles (families.STAGES): each projection with its adapter, then split."""
        g, out = self.g, {}
        for proj in self.spec.arch.stage_projections(stage):
            y = self.linear(x, layer, proj.name, route, ffn_slot)
            if len(proj.roles) == 1:
                out[proj.roles[0]] = y
            else:
                sizes = [self.spec.role_shape(r)[0] for r in proj.roles]
                out.update(zip(proj.roles, g.op("Split", [y, g.const(sizes)], n_out=len(sizes), axis=-1)))
        return [out[r] for r in STAGES[stage]]

    def rope_tables(self, positions: str, rope, name: str) -> tuple[str, str]:
        """cos, sin [B, 1, S, rotary_dim] in the model dtype for position ids [B, S] (features.rope_cos_sin)."""
        g = self.g
        cos, sin = features.rope_cos_sin(self.xp, rope, self.xp.value(positions, I64), self.elem, name)
        return (g.op("Unsqueeze", [cos.name, g.const([1])], hint="rope_cos"),
                g.op("Unsqueeze", [sin.name, g.const([1])], hint="rope_sin"))

    def embed_flat(self, input_ids: str) -> str:
        g = self.g
        h = g.op("Gather", [self.weight(EMBED), input_ids], axis=0)
        if self.spec.embed_scale != 1.0:
            h = g.op("Mul", [h, g.const_of(self.spec.embed_scale, self.dtype)], hint="embed_scale")
        return g.op("Reshape", [h, g.const([-1, self.spec.hidden_size])], hint="embed")

    def pregate_route(self, x: str) -> tuple[str, str]:
        bias = self.router_weight("pregate.bias") if "pregate.bias" in self.ckpt.adapters else None
        return self.route(x, self.router_weight("pregate.weight"), bias, self.aspec.top_k, self.aspec.normalize_topk)

    def unflatten_route(self, ids: str, gates: str, input_ids: str) -> tuple[str, str]:
        g = self.g
        shape = g.op("Concat", [g.op("Shape", [input_ids]), g.const([self.aspec.top_k])], axis=0)
        return g.op("Reshape", [ids, shape]), g.op("Reshape", [gates, shape])


class DecoderBuilder(_Builder):
    def build(self):
        g, s, a = self.g, self.spec, self.aspec
        k, kv, d, H = a.top_k, s.num_kv_heads, s.head_dim, s.num_heads
        ids_in = g.input(contract.INPUT_IDS, I64, ["batch", "seq"])
        past_lengths = g.input(contract.PAST_LENGTHS, I64, ["batch"])
        seq_lens = g.input(contract.SEQ_LENS, I64, ["batch"])
        route = None
        routes_in = a.routing == "pregate" and not pregate_in_decoder(self.ckpt)
        if routes_in:
            e_in = g.input(contract.EXPERT_IDS, I32, ["batch", "seq", k])
            g_in = g.input(contract.GATES, F32, ["batch", "seq", k])
            route = (g.op("Reshape", [e_in, g.const([-1, k])]), g.op("Reshape", [g_in, g.const([-1, k])]))
        past = []
        cache_axis = contract.CACHE_AXIS if self.cache_len is None else self.cache_len  # static in place: TensorRT needs it
        for layer in range(s.num_layers):
            past.append(tuple(g.input(contract.past_name(layer, value), self.elem, ["batch", kv, cache_axis, d])
                              for value in (False, True)))
        pos_in, kpos = self.row_lengths(ids_in, past_lengths, seq_lens, past[0][0])
        if self.cache_len is None:
            write, gather = self.copy_rows(ids_in, past_lengths, seq_lens, past[0][0], kpos)
        else:
            scatter = self.scatter_rows(ids_in, past_lengths, seq_lens, past[0][0])

        # rotary tables [B, 1, S, rotary_dim] per RoPE base, causal masks [B, 1, 1, S, T] per window
        rope = {r: self.rope_tables(pos_in, r, name)
                for r, name in ((s.rope, "rope.inv_freq"), (s.sliding_rope, "rope.inv_freq.sliding")) if r is not None}
        qpos = g.op("Unsqueeze", [pos_in, g.const([2])])  # [B, S, 1]
        causal = g.op("LessOrEqual", [kpos, qpos])  # also hides the cache beyond each valid query's row
        masks: dict[int | None, str] = {None: g.op("Unsqueeze", [causal, g.const([1, 2])], hint="causal_mask")}
        if s.sliding_window is not None:
            window = g.op("Greater", [kpos, g.op("Sub", [qpos, g.const(s.sliding_window)])])
            masks[s.sliding_window] = g.op("Unsqueeze", [g.op("And", [causal, window]), g.const([1, 2])], hint="sliding_mask")
        neg_inf = g.const(-np.inf, np.float32)
        q_shape = g.op("Concat", [g.op("Shape", [ids_in]), g.const([H, d])], axis=0)
        kv_shape = g.op("Concat", [g.op("Shape", [ids_in]), g.const([kv, d])], axis=0)
        arch, norms = s.arch, s.arch.norms

        h = self.embed_flat(ids_in)
        for layer in range(s.num_layers):
            p = f"model.layers.{layer}"
            x = self.rms_norm(h, arch.norm_weight(layer, norms.attn_in))
            # attention
            def heads(t, shape, norm=None):
                t = g.op("Reshape", [t, shape])  # [B, S, heads, d]
                if norm is not None:  # per-head q/k norm (Qwen3, Gemma 3)
                    t = self.rms_norm(t, arch.qk_norm_weight(layer, norm))
                return g.op("Transpose", [t], perm=[0, 2, 1, 3])  # [B, heads, S, d]

            cos, sin = rope[s.layer_rope(layer)]

            def apply_rope(t):
                xp = self.xp
                return features.apply_rope(xp, xp.value(t, self.elem), xp.value(cos, self.elem),
                                           xp.value(sin, self.elem), s.rotary_dim, d).name

            q_flat, k_flat, v_flat = self.project(x, layer, "qkv", route)
            q = apply_rope(heads(q_flat, q_shape, "q" if arch.qk_norm else None))
            kk = apply_rope(heads(k_flat, kv_shape, "k" if arch.qk_norm else None))
            v = heads(v_flat, kv_shape)
            if self.cache_len is None:
                pk, pv = (g.op("Where", [write, g.op("GatherND", [new, gather], batch_dims=2), old], hint=f"present_{layer}")
                          for new, old in ((kk, past[layer][0]), (v, past[layer][1])))
            else:
                # TensorScatter's own output is the graph's present (no Identity): TensorRT's in-place layer needs its
                # output to be a network output
                pk, pv = (self.scatter_present(new, old, *scatter, contract.present_name(layer, value))
                          for value, new, old in ((False, kk, past[layer][0]), (True, v, past[layer][1])))
            for value, t in ((False, pk), (True, pv)):
                g.output(contract.present_name(layer, value), t, self.elem, ["batch", kv, cache_axis, d])
            q5 = g.op("Reshape", [q, g.const([0, kv, H // kv, -1, d])])  # [B, KV, rep, S, d]
            k5 = g.op("Transpose", [g.op("Unsqueeze", [pk, g.const([2])])], perm=[0, 1, 2, 4, 3])  # [B, KV, 1, d, T]
            v5 = g.op("Unsqueeze", [pv, g.const([2])])  # [B, KV, 1, T, d]
            scores = self.softcap(g.op("Mul", [g.op("MatMul", [q5, k5]), g.const_of(s.query_scale, self.dtype)]),
                                  s.attn_softcap, self.dtype)
            scores = g.op("Where", [masks[s.window(layer)], g.cast(scores, F32, self.elem), neg_inf])
            probs = g.cast(g.op("Softmax", [scores], axis=-1), self.elem, F32)
            o = g.op("Reshape", [g.op("MatMul", [probs, v5]), g.const([0, H, -1, d])])  # [B, H, S, d]
            o = g.op("Reshape", [g.op("Transpose", [o], perm=[0, 2, 1, 3]), g.const([-1, H * d])])
            o = self.project(o, layer, "o", route)[0]
            if norms.attn_out is not None:
                o = self.rms_norm(o, arch.norm_weight(layer, norms.attn_out))
            h = g.op("Add", [h, o], hint=f"{p}.attn_residual")
            # MLP
            x = self.rms_norm(h, arch.norm_weight(layer, norms.mlp_in))
            if layer == 0 and pregate_in_decoder(self.ckpt):
                route = self.pregate_route(x)
                e_out, g_out = self.unflatten_route(*route, ids_in)
                g.output(contract.EXPERT_IDS, e_out, I32, ["batch", "seq", k])
                g.output(contract.GATES, g_out, F32, ["batch", "seq", k])
            m = self.mlp(x, layer, route)
            if norms.mlp_out is not None:
                m = self.rms_norm(m, arch.norm_weight(layer, norms.mlp_out))
            h = g.op("Add", [h, m], hint=f"{p}.mlp_residual")
        h = self.rms_norm(h, FINAL_NORM)
        logits = g.cast(g.op("Gemm", [h, self.weight(LM_HEAD)], transB=1, hint="lm_head"), F32, self.elem)
        logits = self.softcap(logits, s.final_softcap, "float32")
        shape = g.op("Concat", [g.op("Shape", [ids_in]), g.const([s.vocab_size])], axis=0)
        g.output(contract.LOGITS, g.op("Reshape", [logits, shape]), F32, ["batch", "seq", s.vocab_size])
        return self._finish("decoder")

    def row_lengths(self, ids: str, past_lengths: str, seq_lens: str, cache: str) -> tuple[str, str]:
        """What each row's own length gives the graph (contract.py):
        positions [B, S]: past_lengths[b] + min(j, seq_lens[b] - 1), so padding repeats the row's last position;
        kpos [T]: the cache's positions 0 .. cache_len - 1."""
        g = self.g
        width = g.op("Shape", [ids], start=1, end=2)  # [1] = S
        cols = g.op("Range", [g.const(0), g.op("Squeeze", [width, g.const([0])]), g.const(1)])  # [S]
        last = g.op("Max", [g.op("Sub", [seq_lens, g.const(1)]), g.const(0)])  # [B]
        past_col = g.op("Unsqueeze", [past_lengths, g.const([1])])  # [B, 1]
        positions = g.op("Add", [past_col, g.op("Min", [g.op("Unsqueeze", [cols, g.const([0])]),
                                                         g.op("Unsqueeze", [last, g.const([1])])])], hint="positions")
        cache_len = g.op("Shape", [cache], start=2, end=3)  # [1] = T
        kpos = g.op("Range", [g.const(0), g.op("Squeeze", [cache_len, g.const([0])]), g.const(1)])  # [T]
        return positions, kpos

    def copy_rows(self, ids: str, past_lengths: str, seq_lens: str, cache: str, kpos: str) -> tuple[str, str]:
        """The copy form's indices (kv_update "copy"):
        write [B, 1, T, 1]: cache entries this step writes (past_lengths[b] <= t < past_lengths[b] + seq_lens[b]);
        gather [B, KV, T, 1]: for entry t, the new column it takes (t - past_lengths[b], clamped into the step).
        The present is Where(write, GatherND(new, gather, batch_dims 2), past): every row is written at its own
        position with standard ops of static rank (no scatter: padding columns never reach the cache); the
        indices are one per cache entry and head, not per element."""
        g = self.g
        width = g.op("Shape", [ids], start=1, end=2)  # [1] = S
        past_col = g.op("Unsqueeze", [past_lengths, g.const([1])])  # [B, 1]
        offset = g.op("Sub", [g.op("Unsqueeze", [kpos, g.const([0])]), past_col])  # [B, T]: t - past_lengths[b]
        inside = g.op("And", [g.op("GreaterOrEqual", [offset, g.const(0)]),
                              g.op("Less", [offset, g.op("Unsqueeze", [seq_lens, g.const([1])])])])
        write = g.op("Unsqueeze", [inside, g.const([1, 3])], hint="kv_write")  # [B, 1, T, 1]
        column = g.op("Max", [g.op("Min", [offset, g.op("Sub", [width, g.const(1)])]), g.const(0)])  # [B, T]
        heads = g.op("Concat", [g.op("Shape", [cache], end=3), g.const([1])], axis=0)  # [B, KV, T, 1]
        gather = g.op("Expand", [g.op("Unsqueeze", [column, g.const([1, 3])]), heads], hint="kv_column")
        return write, gather

    def scatter_rows(self, ids: str, past_lengths: str, seq_lens: str, cache: str) -> tuple[str, str, str, str]:
        """The in-place form's indices (kv_update "in-place"): TensorScatter writes `seq` entries per row from
        write_index [B] = min(past_lengths, T - seq), so it never writes past T; entry write_index + j takes the new
        column (write_index + j - past_lengths[b]) where it is one of the row's seq_lens[b] new entries, else the
        past's own entry (rewritten unchanged): the contract's "every other entry copied", the gathers [B, KV, seq, d].
        Returns (write_index [B], inside [B, 1, S, 1], new column [B, KV, S, 1], cache entry [B, KV, S, 1])."""
        g = self.g
        width = g.op("Shape", [ids], start=1, end=2)  # [1] = S
        cols = g.op("Range", [g.const(0), g.op("Squeeze", [width, g.const([0])]), g.const(1)])  # [S]
        room = g.op("Squeeze", [g.op("Sub", [g.op("Shape", [cache], start=2, end=3), width]), g.const([0])])  # T - S
        write_index = g.op("Min", [past_lengths, room], hint="kv_write_index")  # [B]
        entry = g.op("Add", [g.op("Unsqueeze", [write_index, g.const([1])]), g.op("Unsqueeze", [cols, g.const([0])])])  # [B, S]
        offset = g.op("Sub", [entry, g.op("Unsqueeze", [past_lengths, g.const([1])])])  # entry - past_lengths[b]
        inside = g.op("And", [g.op("GreaterOrEqual", [offset, g.const(0)]),
                              g.op("Less", [offset, g.op("Unsqueeze", [seq_lens, g.const([1])])])])
        column = g.op("Max", [g.op("Min", [offset, g.op("Sub", [width, g.const(1)])]), g.const(0)])  # [B, S]
        heads = g.op("Concat", [g.op("Shape", [cache], end=2), width, g.const([1])], axis=0)  # [B, KV, S, 1]

        def per_head(t: str, hint: str) -> str:
            return g.op("Expand", [g.op("Unsqueeze", [t, g.const([1, 3])]), heads], hint=hint)
        return (write_index, g.op("Unsqueeze", [inside, g.const([1, 3])], hint="kv_scatter_new"),
                per_head(column, "kv_scatter_column"), per_head(entry, "kv_scatter_entry"))

    def scatter_present(self, new: str, past: str, write_index: str, inside: str, column: str, entry: str,
                        present: str) -> str:
        """present = TensorScatter(past, update, write_index, axis 2) (scatter_rows): in TensorRT >= 10.15 an
        IKVCacheUpdateLayer, whose output shares the past's memory."""
        g = self.g
        update = g.op("Where", [inside, g.op("GatherND", [new, column], batch_dims=2),
                                g.op("GatherND", [past, entry], batch_dims=2)], hint=f"{present}.update")
        return g.op("TensorScatter", [past, update, write_index], out=present, axis=2, hint=present)

    def mlp(self, x: str, layer: int, route) -> str:
        g, a = self.g, self.aspec
        if a.expert_kind == "ffn":
            ids, gates = self.route(x, self.router_weight(f"layers.{layer}.mlp.router.weight"), None, a.top_k, a.normalize_topk)
            out: str | None = None
            for j in range(a.top_k):
                e = g.op("Slice", [ids, g.const([j]), g.const([j + 1]), g.const([1])])  # [N, 1]
                gate, up = self.project(x, layer, "gate_up", ffn_slot=e)
                down = self.project(g.op("Mul", [self.activation(gate), up]), layer, "down", ffn_slot=e)[0]
                gj = g.cast(g.op("Slice", [gates, g.const([j]), g.const([j + 1]), g.const([1])]), self.elem, F32)
                term = g.op("Mul", [gj, down])
                out = term if out is None else g.op("Add", [out, term])
            assert out is not None  # top_k >= 1
            return out
        gate, up = self.project(x, layer, "gate_up", route)
        return self.project(g.op("Mul", [self.activation(gate), up]), layer, "down", route)[0]

    def activation(self, x: str) -> str:
        """The family's MLP activation (features.activation)."""
        return features.activation(self.xp, self.spec.hidden_act, self.xp.value(x, self.elem)).name

    def softcap(self, x: str, cap: float | None, dtype: str) -> str:
        """cap * tanh(x / cap) in x's dtype (attention scores, final logits); None: x (features.softcap)."""
        return features.softcap(self.xp, self.xp.value(x, ELEM[dtype]), cap).name

    def _finish(self, graph: str) -> Graph:
        """The built graph with its weights still unread (Graph.model() materialises them)."""
        self.g.opset_imports = {plugin_ops.DOMAIN: plugin_ops.DOMAIN_VERSION} if self.flavour == "plugin" and self._uses_plugin() else {}
        self.g.metadata = metadata(self.ckpt, graph, self.flavour, self.dtype, self.weights)
        if graph == "decoder" and self.kv_update != "copy":
            self.g.metadata["adafuse.kv_update"] = self.kv_update
        if self.weights == "fp8":
            self.g.metadata["adafuse.fp8_quantized_from"] = str(self.quantize_from).removeprefix("torch.")
        if self._uses_plugin():
            self.g.metadata["adafuse.strategy"] = self.strategy
        return self.g

    def _uses_plugin(self) -> bool:
        return any(n.domain == plugin_ops.DOMAIN for n in self.g.nodes)


class PregateBuilder(DecoderBuilder):
    def build(self):
        g, a = self.g, self.aspec
        if not has_pregate_graph(self.ckpt):
            raise AdafuseError(f"{self.ckpt.path}: a separate pre-gate graph needs routing 'pregate' with pregate_input "
                               f"'attn_norm_0', found routing '{a.routing}', pregate_input '{a.pregate_input}'")
        ids_in = g.input("input_ids", I64, ["batch", "seq"])
        arch = self.spec.arch
        x = self.rms_norm(self.embed_flat(ids_in), arch.norm_weight(0, arch.norms.attn_in))
        e_out, g_out = self.unflatten_route(*self.pregate_route(x), ids_in)
        g.output("expert_ids", e_out, I32, ["batch", "seq", a.top_k])
        g.output("gates", g_out, F32, ["batch", "seq", a.top_k])
        return self._finish("pregate")


def build_decoder(ckpt: Checkpoint, flavour: str = "portable", dtype: str = "float32", strategy: str | None = None,
                  weights: str = "dtype", quantize_from: str | None = None, kv_update: str = "copy",
                  cache_len: int | None = None) -> Graph:
    """The decoder graph, weights deferred: `.model()` gives an inline ModelProto, export.write_model streams.
    strategy (plugin flavour only): which plugin op the adapter sites use (plugin_ops.STRATEGIES).
    weights 'fp8': every projection's base weight as float8e4m3fn with float32 per-output-channel scales
    (quantize.py, from the weight rounded to quantize_from, default dtype), opset 19.
    kv_update 'in-place' (plugin flavour only): present = TensorScatter into the past, whose cache axis is static
    (cache_len positions), opset 24 (KV_UPDATES)."""
    return DecoderBuilder(ckpt, flavour, dtype, "adafuse_decoder", strategy, weights, quantize_from, kv_update,
                          cache_len).build()


def build_pregate(ckpt: Checkpoint, dtype: str = "float32") -> Graph:
    return PregateBuilder(ckpt, "portable", dtype, "adafuse_pregate").build()
