"""The exact pre-gate as a routing table file (`export-routes`, the ONNX export's routes.safetensors, the
native artifact's): expert_ids [vocab, k] int32 and gates [vocab, k] float32, written in one place."""
from __future__ import annotations

from pathlib import Path

from .checkpoint import Checkpoint
from .onnx import plugin_ops
from .weights import torch_dtype


def write_routing_table(ckpt: Checkpoint, path: Path, dtype: str) -> dict:
    """reference.routing_table (what ReferenceModel.routing_table returns) computed in `dtype` from the four
    tensors it needs rather than a whole reference model; atomic, marked as ours. Returns its description."""
    from .reference.model import routing_table
    from .tensors import save_safetensors

    a, td = ckpt.adapter, torch_dtype(dtype)

    def get(src, name):
        return src.get(name).to(td)

    bias = get(ckpt.adapters, "pregate.bias") if "pregate.bias" in ckpt.adapters else None
    m = ckpt.model
    norm0 = m.arch.norm_weight(0, m.arch.norms.attn_in)
    ids, gates = routing_table(m, get(ckpt.base, "model.embed_tokens.weight"), get(ckpt.base, norm0),
                               get(ckpt.adapters, "pregate.weight"), bias, a.top_k, a.normalize_topk)
    plugin_ops.check_expert_ids(ids.numpy(), a.num_experts, f"{ckpt.path}: routing table 'expert_ids'")
    save_safetensors({"expert_ids": ids, "gates": gates.float()}, path,  # atomic, umask permissions, marked as ours
                     {"checkpoint_index_sha256": ckpt.index_sha256(), "dtype": dtype}, output="routes")
    return {"file": Path(path).name, "expert_ids": [list(ids.shape), "int32"], "gates": [list(gates.shape), "float32"]}
