"""ONNX Runtime runner over an `export-onnx` output (portable or plugin flavour).

`device` picks the execution provider: cpu, cuda (onnxruntime-gpu's CUDA provider, refused when
absent) or auto (cuda when available, else cpu). The CUDA provider runs with use_tf32=0: its
default TF32 matmuls put float32 graphs about 1e-3 off the reference (measured on the H200,
benchmarks/results/ort_gpu.json), ten times the float32 tolerance. Pre-gated models
with a separate pre-gate run pregate.onnx (or, without it, gather from routes.safetensors)
and feed its expert ids and gates to the decoder; layer-routed models route in-graph.
Plugin-flavour decoders run their adafuse nodes as Python custom ops (plugin_ops_ort.py) on
a session copy of the graph prepared in memory; `plugin_ops` picks their implementation
(cpu: numpy; cuda: the plugins' kernels; auto: cuda when torch sees a GPU).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AdafuseError, missing_dependency
from ..onnx import contract
from .base import ModelInfo, Runner, StepResult, read_routes

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise missing_dependency("onnxruntime", "onnx") from None
    return onnxruntime


Provider = str | tuple[str, dict[str, str]]
DEVICES = ("auto", "cpu", "cuda")
CUDA_PROVIDER: Provider = ("CUDAExecutionProvider", {"use_tf32": "0"})


def providers_for(ort, device: str = "auto") -> list[Provider]:
    """The ONNX Runtime providers for --device (cpu, cuda or auto)."""
    if device not in DEVICES:
        raise AdafuseError(f"--device '{device}' is unknown (expected one of {', '.join(DEVICES)})")
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cuda" and not has_cuda:
        raise AdafuseError(f"--device cuda: ONNX Runtime {ort.__version__} here has no CUDAExecutionProvider "
                           "(install onnxruntime-gpu: pip install 'adafuse-export[gpu]')")
    if device == "cpu" or not has_cuda:
        return ["CPUExecutionProvider"]
    return [CUDA_PROVIDER, "CPUExecutionProvider"]


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    def __init__(self, model: Path | str, providers: list[Provider] | None = None, threads: int | None = None,
                 plugin_ops: str = "auto", device: str = "auto", layerwise: bool = False):
        """layerwise: run the decoder one layer at a time (LayerSessions: per-layer subgraphs, each session
        made, run and dropped in turn), its weights left in the memory-mapped external data file: no
        graph optimisations (on the CPU, constant folding turns a float16 weight's Cast into a float32
        copy of it) and no prepacking (a packed copy of every MatMul weight). Measured on a 7B float16
        graph: the default whole-graph session passed 20 GiB; a whole-graph session without
        optimisations held 13.3 GiB, all of it pages of the data file (docs/large-models.md)."""
        ort = import_onnxruntime()
        from ..onnx.load import load_header, metadata, resolve, uses_plugin

        self.files = resolve(Path(model))
        header = load_header(self.files.decoder)
        self.plugin = None
        if uses_plugin(header):
            from .plugin_ops_ort import PluginGraph

            self.plugin = PluginGraph(header, self.files.decoder, plugin_ops)
        self.meta = metadata(header)
        self.header = header
        declared = [v.name for v in header.graph.input]
        for needed in (contract.INPUT_IDS, contract.PAST_LENGTHS, contract.SEQ_LENS, contract.past_name(0, False)):
            if needed not in declared:
                raise AdafuseError(f"{self.files.decoder}: decoder input '{needed}' not found (found {', '.join(declared)}; "
                                   f"an export older than format {contract.VERSION} has no length per row: export it again)")
        options = ort.SessionOptions()
        options.log_severity_level = 4  # failures reach the user as one-line errors, not as its log
        if threads:
            options.intra_op_num_threads = threads
        if layerwise:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            options.add_session_config_entry("session.disable_prepacking", "1")
            # no arena: an output array keeps its allocator's memory alive, and an arena is the session's
            # largest buffers (float32 copies of a layer's float16 weights): carrying one layer's outputs
            # to the next held 0.29 GiB per 7B layer (measured)
            options.enable_cpu_mem_arena = False
        self.providers = providers or providers_for(ort, device)
        self.device = device
        if layerwise:
            self.session: Any = LayerSessions(self, ort, header, options)
        else:
            self.session = self._session(ort, self.files.decoder, options)
        self.provider = self.session.get_providers()[0]
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._load_header = load_header
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.num_layers = len(self.past_names) // 2
        k0 = self.inputs["past_key_values.0.key"]
        if k0.type not in _NP:
            raise AdafuseError(f"{self.files.decoder}: past_key_values dtype {k0.type} cannot be fed from numpy "
                               f"(ONNX Runtime runner supports float32 and float16 graphs)")
        self.kv_dtype = _NP[k0.type]
        self.kv_heads, self.head_dim = k0.shape[1], k0.shape[3]
        # a fixed cache axis: an in-place graph's (builder kv_update "in-place"), fed whole; else it grows with the rows
        self.cache_len = k0.shape[2] if isinstance(k0.shape[2], int) else None
        logits = next(o for o in self.session.get_outputs() if o.name == "logits")
        self.vocab_size = logits.shape[2] if isinstance(logits.shape[2], int) else None
        self.needs_routes = "expert_ids" in self.inputs
        self.pregate = self.table = None
        if self.needs_routes:
            if self.files.pregate is not None:
                self._load_header(self.files.pregate)
                self.pregate = self._session(ort, self.files.pregate, options)
            elif self.files.routes is not None:
                experts = self.meta.get("adafuse.num_experts", "")
                self.table = read_routes(self.files.routes, int(experts) if experts.isdigit() else None, self.vocab_size)
            else:
                raise AdafuseError(f"{self.files.decoder}: the decoder takes expert_ids/gates but neither pregate.onnx "
                                   f"nor routes.safetensors is next to it")
        # the graph's own tensor type, never its metadata's claim: the dtype picks validate's tolerance
        dtype = "float16" if self.kv_dtype == np.float16 else "float32"
        self.info = ModelInfo(model=self.files.decoder, num_layers=self.num_layers, vocab_size=self.vocab_size,
                              kv_heads=self.kv_heads, head_dim=self.head_dim, needs_routes=self.needs_routes, dtype=dtype,
                              meta=self.meta, description=f"ONNX Runtime {ort.__version__}, {self.provider}, {dtype}, "
                                                          f"{self.meta.get('adafuse.flavour', '?')} flavour"
                                                          + (f"; plugin ops: {self.plugin.description}" if self.plugin else "")
                                                          + (", one layer at a time (per-layer subgraphs, weights "
                                                             "memory-mapped)" if layerwise else ""))
        self.past: dict[str, np.ndarray] | None = None
        self._past_len = self._reach = 0

    def _session(self, ort, path: Path, options, source: str | bytes | None = None, what: str = "this model"):
        """A session over `path` (or over `source`, model bytes made from it)."""
        if source is None:
            # a plugin-flavour decoder runs as its prepared in-memory copy (the file is untouched)
            source = self.plugin.session_source(options) if self.plugin and path == self.files.decoder else str(path)
        try:
            try:
                return ort.InferenceSession(source, options, providers=self.providers)
            except Exception:
                if self.providers == ["CPUExecutionProvider"] or self.device == "cuda":
                    raise
                self.providers = ["CPUExecutionProvider"]  # e.g. onnxruntime-gpu without a usable GPU
                return ort.InferenceSession(source, options, providers=self.providers)
        except Exception as e:  # ONNX Runtime raises its own exception types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AdafuseError(f"{path}: ONNX Runtime cannot load {what}: {first}") from None

    # ---- interface -------------------------------------------------------------------
    def _check_ids(self, input_ids) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2:
            raise AdafuseError(f"input ids must be [batch, seq], found shape {list(ids.shape)}")
        if self.vocab_size is not None:
            bad = ids[(ids < 0) | (ids >= self.vocab_size)]
            if bad.size:
                raise AdafuseError(f"token id {int(bad[0])} is out of the vocabulary [0, {self.vocab_size})")
        return ids

    def routes(self, input_ids):
        ids = self._check_ids(input_ids)
        if self.pregate is not None:
            e, g = self.pregate.run(None, {"input_ids": ids})
            return e, g
        if self.table is not None:
            return self.table[0][ids], self.table[1][ids]
        return None

    def step(self, input_ids, past_lengths, seq_lens) -> StepResult:
        """One in-flight step over the rows of the held cache (contract.py): row b's first seq_lens[b] ids continue
        its sequence at position past_lengths[b] (0 starts a new one in that row; seq_lens 0 carries the row).
        The cache is made for the batch on first use and grows to hold every row's reach (a static cache axis: made
        whole). Logits [B, S, vocab] (columns beyond a row's seq_lens mean nothing); present: the cache up to the
        furthest reach of any row so far (a static cache: its first that many entries)."""
        ids = self._check_ids(input_ids)
        batch, seq = ids.shape
        if self.past is not None and next(iter(self.past.values())).shape[0] != batch:
            raise AdafuseError(f"step batch {batch} differs from the cache's {next(iter(self.past.values())).shape[0]} rows")
        past = np.asarray(past_lengths, np.int64)
        n = np.asarray(seq_lens, np.int64)
        cache_len = 0 if self.past is None else next(iter(self.past.values())).shape[2]
        contract.check_step(past_lengths, seq_lens, batch, seq,
                            self.cache_len if self.cache_len is not None else max(cache_len, int((past + n).max(initial=0))))
        return self._run(ids, past, n)

    def _run(self, ids: np.ndarray, past_lengths: np.ndarray, seq_lens: np.ndarray) -> StepResult:
        batch, seq = ids.shape
        need = int((past_lengths + seq_lens).max(initial=0))
        if self.past is None:
            self.past = {n: np.zeros((batch, self.kv_heads, self.cache_len or 0, self.head_dim), self.kv_dtype)
                         for n in self.past_names}
            self._reach = 0
        have = next(iter(self.past.values())).shape[2]
        if need > have and self.cache_len is not None:
            raise AdafuseError(f"{self.files.decoder}: {need} positions exceed the graph's static cache of {self.cache_len} "
                               "(an in-place export's --max-seq)")
        if need > have:  # zeros: the contract wants finite values beyond every row's length
            grow = np.zeros((batch, self.kv_heads, need - have, self.head_dim), self.kv_dtype)
            self.past = {n: np.concatenate([v, grow], axis=2) for n, v in self.past.items()}
        feeds = {contract.INPUT_IDS: ids, contract.PAST_LENGTHS: past_lengths, contract.SEQ_LENS: seq_lens}
        feeds.update(self.past)
        expert_ids = gates = None
        run = self.plugin.run if self.plugin else lambda session, names, f: session.run(names, f)
        try:
            if self.needs_routes:
                expert_ids, gates = self.routes(ids)
                feeds[contract.EXPERT_IDS], feeds[contract.GATES] = expert_ids, gates
            outs = dict(zip(self.output_names, run(self.session, self.output_names, feeds)))
        except Exception as e:  # ONNX Runtime's own types: a model that cannot run its inputs is the model's fault
            if isinstance(e, AdafuseError) or type(e).__module__.split(".")[0] != "onnxruntime":
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AdafuseError(f"{self.files.decoder}: ONNX Runtime cannot run this model: {first}") from None
        present = {n: outs[n] for n in self.output_names if n.startswith(contract.PRESENT_PREFIX)}
        self.past = {contract.PAST_PREFIX + n[len(contract.PRESENT_PREFIX):]: v for n, v in present.items()}
        self._past_len, self._reach = need, max(self._reach, need)
        if self.cache_len is not None:  # what a growing cache would hold: the entries up to the furthest reach
            present = {n: v[:, :, :self._reach] for n, v in present.items()}
        if contract.EXPERT_IDS in outs:
            expert_ids, gates = outs[contract.EXPERT_IDS], outs[contract.GATES]
        return StepResult(outs[contract.LOGITS], present, expert_ids, gates)

    def _uniform(self, ids: np.ndarray) -> StepResult:
        """Every row continues at the same length (prefill and decode)."""
        batch, seq = ids.shape
        return self._run(ids, np.full(batch, self._past_len, np.int64), np.full(batch, seq, np.int64))

    def prefill(self, input_ids):
        ids = self._check_ids(input_ids)
        self.past, self._past_len = None, 0
        return self._uniform(ids)

    def decode(self, input_ids):
        if self.past is None:
            raise AdafuseError("decode() called before prefill()")
        ids = self._check_ids(input_ids)
        if ids.shape[0] != next(iter(self.past.values())).shape[0]:
            raise AdafuseError(f"decode batch {ids.shape[0]} differs from the prefill batch {next(iter(self.past.values())).shape[0]}")
        return self._uniform(ids)

    @property
    def past_length(self) -> int:
        return self._past_len


class _Arg:
    """What the runner reads of an ONNX Runtime NodeArg (name, type string, shape), from a ValueInfoProto."""

    def __init__(self, value):
        from onnx import TensorProto

        t = value.type.tensor_type
        self.name = value.name
        self.type = f"tensor({_ORT_TYPES.get(t.elem_type, TensorProto.DataType.Name(t.elem_type).lower())})"
        self.shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]


_ORT_TYPES = {1: "float", 10: "float16", 7: "int64", 6: "int32", 9: "bool", 16: "bfloat16"}


class LayerSessions:
    """The decoder as an InferenceSession look-alike (run, get_inputs, get_outputs, get_providers) that runs
    it segment by segment (onnx/segments.py: prologue, one per layer, head): each step makes one
    segment's session, runs it, drops it, then the next, carrying the values between them. At most
    one layer's weights are mapped at a time, so resident pages stay about one layer's, not the model's.
    The segment models (graph only, weights referenced in the data file) are made on first use and kept."""

    def __init__(self, runner: OnnxRuntimeRunner, ort, header, options):
        from ..onnx.segments import split_layers

        self.runner, self.ort, self.options = runner, ort, options
        self.model = runner.plugin.model if runner.plugin else header  # the plugin flavour's prepared copy
        if runner.plugin:
            runner.plugin.configure(options)
        else:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(runner.files.decoder.parent))
        layers = sum(1 for v in header.graph.input if v.name.startswith("past_key_values.")) // 2
        try:
            self.segments = split_layers(self.model, layers)
        except AdafuseError as e:
            raise AdafuseError(f"{runner.files.decoder}: {e}") from None
        self._bytes: dict[int, bytes] = {}
        self._inputs = [_Arg(v) for v in header.graph.input]
        self._outputs = [_Arg(v) for v in header.graph.output]

    def get_inputs(self) -> list[_Arg]:
        return self._inputs

    def get_outputs(self) -> list[_Arg]:
        return self._outputs

    def get_providers(self) -> list[str]:
        return [p if isinstance(p, str) else p[0] for p in self.runner.providers]

    def run(self, output_names: list[str], feeds: dict) -> list:
        from onnx.helper import np_dtype_to_tensor_dtype

        from ..onnx.segments import segment_model

        values = dict(feeds)
        for i, seg in enumerate(self.segments):
            if i not in self._bytes:
                types = {t: np_dtype_to_tensor_dtype(np.asarray(values[t]).dtype) for t in seg.inputs}
                self._bytes[i] = segment_model(self.model, seg, types).SerializeToString()
            session = self.runner._session(self.ort, self.runner.files.decoder, self.options, self._bytes[i],
                                           f"its {seg.name} subgraph")
            outs = session.run(seg.outputs, {t: values[t] for t in seg.inputs})
            del session  # unmaps this segment's weights before the next is mapped
            values.update(zip(seg.outputs, outs))
        return [values[n] for n in output_names]
