"""TensorRT runner over a `convert` output (engine + manifest + ONNX directory).

Checks the manifest first (engine hash, plugin version), then needs a runtime and a GPU the
engine was built for: full TensorRT (+ $ADAFUSE_PLUGIN_LIB for plugin engines) or
TensorRT-RTX (compute capability 8.0, 8.6, 8.9, 12.x). Device buffers are torch CUDA tensors.
Profile 0 runs prefill (empty past), profile 1 decode steps (see adafuse_export.trt.build).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import AdafuseError
from ..onnx.load import resolve
from ..trt.build import DECODE, PREFILL
from ..trt.manifest import verify_engine
from .base import Runner, StepResult

RTX_CAPABILITIES = {(8, 0), (8, 6), (8, 9)}


class TensorRTRunner(Runner):
    name = "tensorrt"

    def __init__(self, engine: Path | str):
        from ..trt.backends import select_backend

        engine = Path(engine)
        self.manifest = manifest = verify_engine(engine)
        info = manifest["engine"]
        backend = select_backend(info["backend"])
        import torch

        if not torch.cuda.is_available():
            raise AdafuseError(f"{engine}: running a TensorRT engine needs an NVIDIA GPU, and none is visible here "
                               f"(validate the ONNX export in {engine.with_suffix('.onnx')} instead)")
        cc = torch.cuda.get_device_capability()
        if backend.name == "tensorrt-rtx" and cc not in RTX_CAPABILITIES and cc[0] != 12:
            raise AdafuseError(f"{engine}: TensorRT-RTX engines run on compute capability 8.0, 8.6, 8.9 and 12.x; "
                               f"this GPU is {cc[0]}.{cc[1]} (build with --backend tensorrt for it)")
        trt = backend.trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        if manifest.get("plugin"):
            lib = os.environ.get("ADAFUSE_PLUGIN_LIB")
            if not lib or not Path(lib).is_file():
                raise AdafuseError(f"{engine}: this engine uses the {manifest['plugin']['library']} plugin library; "
                                   "set ADAFUSE_PLUGIN_LIB to its path")
            trt.get_plugin_registry().load_library(lib)
        runtime = trt.Runtime(self.logger)
        self.engine = runtime.deserialize_cuda_engine(engine.read_bytes())
        if self.engine is None:
            raise AdafuseError(f"{engine}: {backend.name} {backend.version} could not deserialize the engine "
                               f"(built with {info['backend']} {info['backend_version']})")
        self.context = self.engine.create_execution_context()
        self.torch, self.trt = torch, trt
        self.stream = torch.cuda.Stream()
        self.files = resolve(engine.with_suffix(".onnx"))
        self.meta = {"adafuse.dtype": info["dtype"]}
        self.description = f"{backend.name} {backend.version} on {torch.cuda.get_device_name()}, {info['dtype']}"
        inputs = {t["name"]: t for t in manifest["tensors"]["inputs"]}
        self.input_names, self.output_names = list(inputs), [t["name"] for t in manifest["tensors"]["outputs"]]
        k0 = inputs["past_key_values.0.key"]
        self.kv_heads, self.head_dim = k0["shape"][1], k0["shape"][3]
        self.num_layers = sum(1 for n in inputs if n.endswith(".key"))
        self.kv_dtype = {"float": torch.float32, "half": torch.float16, "bf16": torch.bfloat16}[k0["dtype"]]
        self.table = None
        routes = manifest["routing"].get("routes_file")
        if "expert_ids" in inputs:
            if not routes:
                raise AdafuseError(f"{engine}: the engine takes expert ids but its manifest names no routing table")
            from safetensors.torch import load_file

            t = load_file(str(engine.parent / routes))
            self.table = (t["expert_ids"].cuda(), t["gates"].float().cuda())
        self.past: dict[str, object] = {}
        self.length = 0

    @property
    def past_length(self) -> int:
        return self.length

    def routes(self, input_ids):
        if self.table is None:
            return None
        ids = self.torch.as_tensor(input_ids).cuda()
        return self.table[0][ids].cpu().numpy(), self.table[1][ids].cpu().numpy()

    def _run(self, input_ids: np.ndarray, profile: int) -> StepResult:
        torch = self.torch
        ids = torch.as_tensor(input_ids, dtype=torch.int64).cuda()
        b, s = ids.shape
        feed = {"input_ids": ids,
                "position_ids": (torch.arange(s, device="cuda") + self.length).expand(b, s).contiguous()}
        if self.table is not None:
            feed["expert_ids"] = self.table[0][ids].contiguous()
            feed["gates"] = self.table[1][ids].contiguous()
        for layer in range(self.num_layers):
            for kind in ("key", "value"):
                name = f"past_key_values.{layer}.{kind}"
                feed[name] = self.past.get(f"present.{layer}.{kind}",
                                           torch.zeros(b, self.kv_heads, 0, self.head_dim, device="cuda", dtype=self.kv_dtype))
        ctx = self.context
        ctx.set_optimization_profile_async(profile, self.stream.cuda_stream)
        for name in self.input_names:
            ctx.set_input_shape(name, tuple(feed[name].shape))
            ctx.set_tensor_address(name, feed[name].data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(ctx.get_tensor_shape(name))
            dtype = torch.float32 if name == "logits" else self.kv_dtype
            outputs[name] = torch.empty(shape, device="cuda", dtype=dtype)
            ctx.set_tensor_address(name, outputs[name].data_ptr())
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise AdafuseError("TensorRT execution failed (see the TensorRT log above)")
        self.stream.synchronize()
        self.past = {n: t for n, t in outputs.items() if n.startswith("present.")}
        self.length += s
        result = StepResult(outputs["logits"].float().cpu().numpy(),
                            {n: t.float().cpu().numpy() for n, t in self.past.items()})
        if self.table is not None:
            result.expert_ids, result.gates = feed["expert_ids"].cpu().numpy(), feed["gates"].cpu().numpy()
        return result

    def prefill(self, input_ids):
        self.past, self.length = {}, 0
        return self._run(input_ids, PREFILL)

    def decode(self, input_ids):
        return self._run(input_ids, DECODE)
