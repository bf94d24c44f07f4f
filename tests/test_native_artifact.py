"""The native artifact (`convert --backend native`, adafuse_export/native_artifact.py) and its C++ reader
(runtime/src/native_artifact.cpp): layouts against the checkpoint's own tensors and the reference's weights,
refusals through adafuse-native-check and the C API, the CLI, and the writer's peak memory. Nothing here executes
the artifact: tests/gpu/test_native_backend.py runs it on a GPU."""
from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adafuse_export import native_artifact as native
from adafuse_export.converters import load_checkpoint
from adafuse_export.examples import make_example
from adafuse_export.reference import ReferenceModel
from adafuse_export.reference.model import lora_delta
from adafuse_export.trt.manifest import sha256_file

from test_runtime import monkeypatch_session, runtime_build, runtime_lib  # noqa: F401  (session fixtures)

REPO = Path(__file__).resolve().parents[1]


def write(ckpt_dir: Path, out: Path, dtype: str = "float32") -> dict:
    out.mkdir()
    return native.write_artifact(load_checkpoint(ckpt_dir), out, dtype, max_batch=2, max_seq=64)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """(kind, family) -> a float32 artifact of that example (and its checkpoint beside it)."""
    root = tmp_path_factory.mktemp("native")
    out = {}
    for kind, family, tied in (("pregate", "llama", False), ("pregate", "phi3", False), ("lora", "llama", False),
                               ("mola", "llama", False), ("mixlora", "qwen2", False), ("pregate-ffn", "llama", False),
                               ("pregate", "gemma2", True), ("pregate", "qwen3", False)):
        name = f"{kind}-{family}"
        make_example(root / name, kind, family, tied=tied)
        write(root / name, root / f"{name}.native")
        out[name] = root / f"{name}.native"
    return out


def tensors(art: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in (native.WEIGHTS, native.ADAPTERS):
        if (art / f).exists():
            out.update(load_file(str(art / f)))
    return out


def ckpt_of(art: Path):
    return load_checkpoint(art.with_suffix(""))


# ---- layouts, against the checkpoint's tensors ----------------------------------------------------------
def test_stage_weights_are_the_projections_stacked_in_role_order(artifacts):
    for name in ("pregate-llama", "mola-llama", "pregate-gemma2"):
        t, ck = tensors(artifacts[name]), ckpt_of(artifacts[name])
        for layer in range(ck.model.num_layers):
            p = f"model.layers.{layer}"
            for stage, mods in (("qkv", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                                ("gate_up", ["mlp.gate_proj", "mlp.up_proj"]), ("o", ["self_attn.o_proj"]),
                                ("down", ["mlp.down_proj"])):
                want = torch.cat([ck.base.get(f"{p}.{m}.weight") for m in mods])
                assert torch.equal(t[f"layers.{layer}.{stage}.weight"], want), (name, layer, stage)


def test_phi3_fused_projections_are_kept_as_they_are(artifacts):
    t, ck = tensors(artifacts["pregate-phi3"]), ckpt_of(artifacts["pregate-phi3"])
    assert torch.equal(t["layers.1.qkv.weight"], ck.base.get("model.layers.1.self_attn.qkv_proj.weight"))
    assert torch.equal(t["layers.1.gate_up.weight"], ck.base.get("model.layers.1.mlp.gate_up_proj.weight"))
    # one routed projection per stage: the grouped site is its own A and scaled B
    scale = ck.adapter.site_scale("layers.1.qkv_proj")
    assert torch.equal(t["layers.1.qkv.lora_A"], ck.adapters.get("layers.1.qkv_proj.lora_A"))
    assert torch.allclose(t["layers.1.qkv.lora_B"].double(), ck.adapters.get("layers.1.qkv_proj.lora_B").double() * scale,
                          rtol=1e-6, atol=0)


def test_qwen2_biases_are_stacked_with_zeros_where_a_projection_has_none(artifacts):
    t, ck = tensors(artifacts["mixlora-qwen2"]), ckpt_of(artifacts["mixlora-qwen2"])
    p = "model.layers.0.self_attn"
    assert torch.equal(t["layers.0.qkv.bias"], torch.cat([ck.base.get(f"{p}.{m}_proj.bias") for m in "qkv"]))
    assert "layers.0.o.bias" not in t  # Qwen2: no bias on o_proj, so the stage has none


def test_grouped_site_is_the_members_lora_computed_at_once(artifacts):
    """For random inputs and routes, the grouped site (scale 1) equals each projection's own LoRA with its
    own scale, computed in float64 from the checkpoint's tensors."""
    t, ck = tensors(artifacts["pregate-llama"]), ckpt_of(artifacts["pregate-llama"])
    gen = torch.Generator().manual_seed(0)
    for layer, stage, mods in ((0, "qkv", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                               (1, "gate_up", ["mlp.gate_proj", "mlp.up_proj"])):
        A, B = t[f"layers.{layer}.{stage}.lora_A"].double(), t[f"layers.{layer}.{stage}.lora_B"].double()
        x = torch.randn(5, A.shape[2], generator=gen, dtype=torch.float64)
        ids = torch.randint(0, A.shape[0], (5, 2), generator=gen)
        gates = torch.rand(5, 2, generator=gen, dtype=torch.float64)
        want = torch.cat([lora_delta(x, ck.adapters.get(f"layers.{layer}.{m.split('.')[1]}.lora_A").double(),
                                     ck.adapters.get(f"layers.{layer}.{m.split('.')[1]}.lora_B").double(), ids, gates,
                                     ck.adapter.site_scale(f"layers.{layer}.{m.split('.')[1]}")) for m in mods], dim=1)
        got = lora_delta(x, A, B, ids, gates, 1.0)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-9), (stage, (got - want).abs().max())


@pytest.mark.parametrize("family,dtype", [("llama", "bfloat16"), ("phi3", "float16"), ("qwen3", "bfloat16")])
def test_layout_is_the_reference_weights_rounded_to_the_dtype(family, dtype, tmp_path):
    """Bit for bit the float32 reference's weights rounded to the artifact's dtype: each stage's projections stacked
    in role order, grouped A, block-diagonal B (rounded, times the site's scale in float32, rounded again), norms,
    embeddings, head; the routing table is the reference's own (float32)."""
    make_example(tmp_path / "ck", "pregate", family)
    write(tmp_path / "ck", tmp_path / "a.native", dtype)
    t = tensors(tmp_path / "a.native")
    ck = load_checkpoint(tmp_path / "ck")
    ref = ReferenceModel(ck, dtype=torch.float32)
    td, m, a = getattr(torch, dtype), ck.model, ck.adapter
    for layer in range(m.num_layers):
        for stage in ("qkv", "o", "gate_up", "down"):
            mods = [p.name for p in m.arch.stage_projections(stage)]
            p = f"layers.{layer}.{stage}"
            W = torch.cat([ref.w[f"{m.arch.weight_prefix(layer, mod)}.weight"].to(td) for mod in mods])
            assert t[f"{p}.weight"].dtype == td and torch.equal(t[f"{p}.weight"], W), p
            As = [ref.a[f"layers.{layer}.{mod}.lora_A"].to(td) for mod in mods]
            assert torch.equal(t[f"{p}.lora_A"], torch.cat(As, dim=1)), p
            B = torch.zeros(a.num_experts, W.shape[0], sum(x.shape[1] for x in As), dtype=td)
            row = col = 0
            for mod, A in zip(mods, As):
                site = f"layers.{layer}.{mod}"
                b = (ref.a[f"{site}.lora_B"].to(td).float() * a.site_scale(site)).to(td)
                B[:, row:row + b.shape[1], col:col + A.shape[1]] = b
                row, col = row + b.shape[1], col + A.shape[1]
            assert torch.equal(t[f"{p}.lora_B"], B), p
    assert torch.equal(t["embed_tokens"], ref.w["model.embed_tokens.weight"].to(td))
    assert torch.equal(t["lm_head"], ref.w["lm_head.weight"].to(td))
    assert torch.equal(t["final_norm"], ref.w["model.norm.weight"].to(td))
    assert torch.equal(t["layers.1.mlp_in_norm"], ref.w["model.layers.1.post_attention_layernorm.weight"].to(td))
    if family == "qwen3":
        assert torch.equal(t["layers.1.k_norm"], ref.w["model.layers.1.self_attn.k_norm.weight"].to(td))
    routes = load_file(str(tmp_path / "a.native" / native.ROUTES))
    ids, gates = ref.routing_table()
    assert torch.equal(routes["expert_ids"], ids.to(torch.int32)) and torch.equal(routes["gates"], gates.float())


def test_static_lora_is_merged_in_float32(artifacts):
    """Plain LoRA (static q, v): no adapter file, W + scale B A in the stacked rows, checked in float64."""
    art = artifacts["lora-llama"]
    t, ck = tensors(art), ckpt_of(art)
    assert not (art / native.ADAPTERS).exists() and not (art / native.ROUTES).exists()
    q = ck.model.role_shape("q")[0]
    kv = ck.model.role_shape("k")[0]

    def merged(m):
        w, A, B = (ck.base.get(f"model.layers.1.self_attn.{m}.weight").double(),
                   ck.adapters.get(f"layers.1.{m}.lora_A")[0].double(), ck.adapters.get(f"layers.1.{m}.lora_B")[0].double())
        return w + ck.adapter.site_scale(f"layers.1.{m}") * (B @ A)

    W = t["layers.1.qkv.weight"].double()
    assert torch.allclose(W[:q], merged("q_proj"), atol=1e-6, rtol=0)
    assert torch.equal(W[q:q + kv], ck.base.get("model.layers.1.self_attn.k_proj.weight").double())
    assert torch.allclose(W[q + kv:], merged("v_proj"), atol=1e-6, rtol=0)
    assert not torch.equal(W[:q], ck.base.get("model.layers.1.self_attn.q_proj.weight").double())


def test_layer_routers_and_ffn_experts(artifacts):
    t, ck = tensors(artifacts["mola-llama"]), ckpt_of(artifacts["mola-llama"])
    scale = ck.adapter.site_scale("layers.0.v_proj")
    assert torch.equal(t["layers.0.v_proj.router"], ck.adapters.get("layers.0.v_proj.router.weight"))
    assert torch.equal(t["layers.0.v_proj.lora_A"], ck.adapters.get("layers.0.v_proj.lora_A"))
    assert torch.allclose(t["layers.0.v_proj.lora_B"].double(), ck.adapters.get("layers.0.v_proj.lora_B").double() * scale,
                          rtol=1e-6, atol=0)
    assert "layers.0.qkv.lora_A" not in t  # each projection keeps its router, so no grouped site
    t, ck = tensors(artifacts["mixlora-qwen2"]), ckpt_of(artifacts["mixlora-qwen2"])
    assert torch.equal(t["layers.1.mlp.router"], ck.adapters.get("layers.1.mlp.router.weight"))
    assert t["layers.1.gate_up.lora_B"].shape == (4, 2 * ck.model.intermediate_size, 16)
    t, ck = tensors(artifacts["pregate-ffn-llama"]), ckpt_of(artifacts["pregate-ffn-llama"])
    assert torch.equal(t["pregate.weight"], ck.adapters.get("pregate.weight"))


def test_rope_tables_and_family_features(artifacts):
    t, ck = tensors(artifacts["pregate-llama"]), ckpt_of(artifacts["pregate-llama"])
    d, theta = ck.model.rotary_dim, ck.model.rope.theta
    independent = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    assert torch.allclose(t["rope.full.inv_freq"].double(), independent, rtol=1e-6, atol=0)
    assert torch.equal(t["rope.full.inv_freq"], ck.model.rope.inv_freq())
    art = artifacts["pregate-gemma2"]
    m = json.loads((art / native.MANIFEST).read_text())
    f = m["features"]
    assert (f["norm"], f["activation"], f["attn_softcap"], f["final_softcap"]) == ("rms_one_plus", "gelu_tanh", 50.0, 30.0)
    assert f["norms"] == {"attn_in": True, "attn_out": True, "mlp_in": True, "mlp_out": True}
    assert f["sliding_layers"] == [0] and f["sliding_window"] == 4096 and m["model"]["tie_word_embeddings"]
    t = tensors(art)
    assert "lm_head" not in t and "layers.0.mlp_out_norm" in t
    assert m["kernels"]["abi_version"] == native.ABI_VERSION and set(m["files"]) == {native.WEIGHTS, native.ADAPTERS, native.ROUTES}
    assert all(m["files"][n] == sha256_file(art / n) for n in m["files"])


def test_kernel_abi_and_limits_equal_the_kernel_header():
    header = (REPO / "plugins/kernels/include/adafuse_kernels.h").read_text()
    define = dict(re.findall(r"#define (ADAFUSE_\w+) (\d+)", header))
    assert int(define["ADAFUSE_KERNELS_ABI_VERSION"]) == native.ABI_VERSION
    source = (REPO / "runtime/src/native_artifact.cpp").read_text()
    limits = dict(re.findall(r"(kMax\w+) = (\d+)", source))
    assert limits == {"kMaxTopK": define["ADAFUSE_MAX_TOP_K"], "kMaxExperts": define["ADAFUSE_LORA_MAX_EXPERTS"],
                      "kMaxRank": define["ADAFUSE_LORA_MAX_RANK"], "kMaxAttnGroup": define["ADAFUSE_ATTN_MAX_GROUP"]}


# ---- the C++ reader: adafuse-native-check and the C API ---------------------------------------------------
def check(runtime_build, art: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(runtime_build / "adafuse-native-check"), str(art)], capture_output=True, text=True,
                          timeout=60)


def open_through_c_api(lib_path: str, art: Path, strategy: bytes | None = None) -> tuple[int, str]:
    from adafuse_export.runners.cpp_runtime import _OpenOptions, load_library

    lib = load_library(lib_path)
    options = _OpenOptions(str(art).encode(), None, None, 0, 1, strategy)
    handle = ctypes.c_void_p()
    status = lib.adafuse_engine_open(ctypes.byref(options), ctypes.byref(handle))
    if status == 0:  # never on CI (no GPU)
        lib.adafuse_engine_free(handle)
    return status, lib.adafuse_last_error().decode()


COVERS = ("every family feature (both norm kinds, post norms, q/k norm, SiLU and GeGLU, embedding scale, partial and "
          "scaled RoPE, sliding windows, soft-capping) with a routing table, an in-decoder pre-gate, per-projection "
          "routers or FFN experts, up to 8 routes per token")


def test_reader_accepts_every_kind_and_names_what_is_not_covered(runtime_build, artifacts):
    covered = check(runtime_build, artifacts["pregate-llama"])
    assert covered.returncode == 0, covered.stderr
    lines = covered.stdout.splitlines()
    assert lines[0].endswith("llama float32, 2 layers, routing pregate (4 experts, top-2), 34 tensors checked, kernel ABI " + str(native.ABI_VERSION))
    assert lines[1] == "needs: RMSNorm, SiLU-gated MLP, full RoPE, GQA decode attention, routing table"
    assert lines[2] == "not covered by the native backend: -"
    for name, needs in (("pregate-qwen3", "RMSNorm, q/k norm, SiLU-gated MLP, full RoPE, GQA decode attention, routing table"),
                        ("mola-llama", "RMSNorm, SiLU-gated MLP, full RoPE, GQA decode attention, a router per projection (layerwise)"),
                        ("mixlora-qwen2", "RMSNorm, SiLU-gated MLP, full RoPE, GQA decode attention, FFN experts (MixLoRA)"),
                        ("pregate-ffn-llama", "RMSNorm, SiLU-gated MLP, full RoPE, GQA decode attention, in-decoder pre-gate "
                                              "(pregate_input mlp_norm_0)"),
                        ("lora-llama", None), ("pregate-phi3", None)):
        proc = check(runtime_build, artifacts[name])
        assert proc.returncode == 0, (name, proc.stderr)
        if needs is not None:
            assert proc.stdout.splitlines()[1] == f"needs: {needs}", name
    # head_dim 256 in float32 is 1 KiB per head, over the attention kernels' 512 bytes: the one refusal left
    proc = check(runtime_build, artifacts["pregate-gemma2"])
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[1] == ("needs: (1+w) RMSNorm, norms of the attention and MLP outputs, GeGLU MLP (gelu tanh), "
                                           "embedding scale, full RoPE, decode attention of head_dim 256 with 2 query heads per "
                                           "KV head, attention soft-capping, sliding-window attention, final logit soft-capping, "
                                           "routing table")
    assert proc.stderr == (f"error: {artifacts['pregate-gemma2']}: gemma2 needs decode attention of head_dim 256 with 2 query "
                           f"heads per KV head, which the native backend does not cover (it runs {COVERS})\n"), proc.stderr


def _safetensors_bytes(path: Path) -> tuple[int, int]:
    """(bytes, tensors) of a safetensors file from its own header, independently of the runtime's reader."""
    header = json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")])
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1}
    entries = [v for k, v in header.items() if k != "__metadata__"]
    total = 0
    for v in entries:
        n = 1
        for d in v["shape"]:
            n *= d
        total += n * sizes[v["dtype"]]
        assert v["data_offsets"][1] - v["data_offsets"][0] == n * sizes[v["dtype"]]
    return total, len(entries)


@pytest.mark.parametrize("name", ["pregate-llama", "mixlora-qwen2", "mola-llama", "pregate-qwen3"])
def test_device_memory_plan_counts_every_tensor_and_the_cache(runtime_build, artifacts, name):
    art = artifacts[name]
    proc = check(runtime_build, art)
    assert proc.returncode == 0, proc.stderr
    plan = {}
    for line in proc.stdout.splitlines():
        m = re.fullmatch(r"plan: (.+?) (\d+) bytes in (\d+) buffers", line)
        if m:
            plan[m.group(1)] = (int(m.group(2)), int(m.group(3)))
        m = re.fullmatch(r"plan: total (\d+) bytes .*", line)
        if m:
            total = int(m.group(1))
    weights = [_safetensors_bytes(art / f) for f in (native.WEIGHTS, native.ADAPTERS) if (art / f).exists()]
    assert plan["weights"] == (sum(b for b, _ in weights), sum(n for _, n in weights))
    m = json.loads((art / native.MANIFEST).read_text())
    model, runtime = m["model"], m["runtime"]
    kv = runtime["max_batch"] * model["num_kv_heads"] * runtime["max_seq"] * model["head_dim"] * 4  # float32
    assert plan["kv cache"] == (2 * model["num_layers"] * kv, 2 * model["num_layers"])
    parts = sum(b for b, _ in plan.values())
    buffers = sum(n for _, n in plan.values())
    assert parts <= total <= parts + 256 * buffers  # each buffer starts on a 256-byte boundary
    routes = m["routing"]["routes_file"]
    if routes:  # the table's ids and gates: int32 and float32 [vocab, top_k]
        assert plan["routes"][0] >= 2 * 4 * model["vocab_size"] * m["routing"]["top_k"]


def test_c_api_checks_everything_then_needs_a_gpu(runtime_lib, artifacts):
    """Without a GPU the native backend is refused at the device, after every file, feature and option check."""
    for name in ("pregate-llama", "mixlora-qwen2", "mola-llama", "pregate-ffn-llama", "lora-llama"):
        status, message = open_through_c_api(runtime_lib, artifacts[name])
        assert status == 5, (name, message)  # ADAFUSE_ERR_CUDA
        assert message.startswith(f"CUDA device 0 (running {artifacts[name]} needs an NVIDIA GPU): ") and "\n" not in message
    status, message = open_through_c_api(runtime_lib, artifacts["pregate-gemma2"])
    assert status == 7 and "gemma2 needs decode attention of head_dim 256" in message  # features before the device


def test_serve_and_generate_open_native_artifacts(runtime_build, artifacts):
    """adafuse-serve and adafuse-generate open a native artifact through the same checks as the C API (not as a
    TensorRT engine, whose manifest would be missing): on this CPU machine they stop at the device, in one line."""
    art = artifacts["pregate-llama"]
    want = f"CUDA device 0 (running {art} needs an NVIDIA GPU): "
    for cmd in ([runtime_build / "adafuse-serve", "--engine", art, "--port", "0", "--strategy", "fused"],
                [runtime_build / "adafuse-generate", "--engine", art, "--prompt-ids", "1,2", "--strategy", "fused"]):
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120)
        name = Path(str(cmd[0])).name
        assert proc.returncode == 1 and proc.stderr.startswith(f"{name}: {want}"), (name, proc.stderr)
        assert proc.stderr.count("\n") == 1, proc.stderr
    proc = subprocess.run([str(runtime_build / "adafuse-serve"), "--engine", str(art), "--strategy", "merged"],
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (
        2, "adafuse-serve: options.strategy 'merged' is unknown (expected 'fused' or 'switch')\n")


def test_strategy_option_refusals(runtime_lib, artifacts, tmp_path):
    art = artifacts["pregate-llama"]
    assert open_through_c_api(runtime_lib, art, b"merged") == (
        1, "options.strategy 'merged' is unknown (expected 'fused' or 'switch')")
    assert open_through_c_api(runtime_lib, art, b"switch") == (
        1, f"{art}: strategy 'switch' merges one sequence's experts into the weights, so it runs batch 1, found "
           "runtime.max_batch 2 (convert with --max-batch 1, or use strategy 'fused')")
    assert open_through_c_api(runtime_lib, artifacts["mola-llama"], b"switch") == (
        1, f"{artifacts['mola-llama']}: strategy 'switch' merges one route per token into every adapted weight, so it needs a "
           "pre-gated artifact, found routing layerwise (use strategy 'fused')")
    # batch 1, pre-gated: switch passes its checks and reaches the device
    one = tmp_path / "one.native"
    one.mkdir()
    native.write_artifact(ckpt_of(art), one, "float32", max_batch=1, max_seq=64)
    status, message = open_through_c_api(runtime_lib, one, b"switch")
    assert status == 5 and message.startswith(f"CUDA device 0 (running {one} needs an NVIDIA GPU): ")
    assert open_through_c_api(runtime_lib, art, b"fused")[0] == 5
    # a TensorRT engine runs the strategy it was built with
    assert open_through_c_api(runtime_lib, tmp_path / "model.engine", b"switch") == (
        1, "options.strategy 'switch': a TensorRT engine runs the strategy it was built with (NULL or 'fused'); 'switch' is a "
           "native artifact's option")


def _copy(art: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(art, dst)
    return dst


def _edit_manifest(art: Path, edit) -> None:
    m = json.loads((art / native.MANIFEST).read_text())
    edit(m)
    (art / native.MANIFEST).write_text(json.dumps(m))


def _rewrite(art: Path, file: str, edit) -> None:
    """Rewrite one safetensors file through `edit(tensors)` and record its new SHA-256 (a consistent artifact
    whose tensors disagree with its config)."""
    t = load_file(str(art / file))
    edit(t)
    save_file(t, str(art / file))
    _edit_manifest(art, lambda m: m["files"].__setitem__(file, sha256_file(art / file)))


REFUSALS = {
    "weights modified": (lambda a: (a / native.WEIGHTS).write_bytes((a / native.WEIGHTS).read_bytes()[:-1] + b"\x7f"),
                         "{a}/weights.safetensors: SHA-256 does not match manifest.json (file modified after conversion)"),
    "routes missing": (lambda a: (a / native.ROUTES).unlink(),
                       "{a}/routes.safetensors: file listed in manifest.json is missing"),
    "format version": (lambda a: _edit_manifest(a, lambda m: m.__setitem__("version", 2)),
                       "{a}/manifest.json: manifest version 2 is not supported (expected 1)"),
    "not native": (lambda a: _edit_manifest(a, lambda m: m.__setitem__("format", "adafuse-engine")),
                   "{a}/manifest.json: not an adafuse native artifact manifest (expected format 'adafuse-native')"),
    "kernel abi": (lambda a: _edit_manifest(a, lambda m: m["kernels"].__setitem__("abi_version", native.ABI_VERSION + 1)),
                   f"{{a}}/manifest.json: written for kernel library ABI {native.ABI_VERSION + 1}, this runtime's kernels are "
                   f"ABI {native.ABI_VERSION} (plugins/kernels "
                   "adafuse_abi_version); convert again with the adafuse-export of this runtime"),
    "manifest missing": (lambda a: (a / native.MANIFEST).unlink(),
                         "{a}: its manifest {a}/manifest.json is missing (adafuse-export convert --backend native writes it; "
                         "the artifact cannot be checked or run without it: convert again)"),
    "weights not listed": (lambda a: _edit_manifest(a, lambda m: m["files"].pop(native.WEIGHTS)),
                           "{a}/manifest.json: 'files' does not list weights.safetensors, which the artifact's layout "
                           "needs (every file the runtime reads is listed with its SHA-256)"),
    "wrong dtype": (lambda a: _rewrite(a, native.WEIGHTS, lambda t: t.__setitem__("layers.1.qkv.weight",
                                                                                  t["layers.1.qkv.weight"].half())),
                    "{a}/weights.safetensors: tensor 'layers.1.qkv.weight' is F16 [128, 64], expected F32 [128, 64] "
                    "(from manifest.json)"),
    "wrong shape": (lambda a: _rewrite(a, native.ADAPTERS, lambda t: t.__setitem__("layers.0.gate_up.lora_B",
                                                                                   t["layers.0.gate_up.lora_B"][:, :-1].contiguous())),
                    "{a}/adapters.safetensors: tensor 'layers.0.gate_up.lora_B' is F32 [4, 191, 16], expected F32 "
                    "[4, 192, 16] (from manifest.json)"),
    "missing tensor": (lambda a: _rewrite(a, native.WEIGHTS, lambda t: t.pop("layers.1.mlp_in_norm")),
                       "{a}/weights.safetensors: missing tensor 'layers.1.mlp_in_norm', expected F32 [64] (from manifest.json)"),
    "extra tensor": (lambda a: _rewrite(a, native.WEIGHTS, lambda t: t.__setitem__("layers.0.extra", torch.zeros(2))),
                     "{a}/weights.safetensors: unexpected tensor 'layers.0.extra' (F32 [2]): the layout manifest.json "
                     "describes has no such tensor"),
    "config disagrees": (lambda a: _edit_manifest(a, lambda m: m["model"].__setitem__("intermediate_size", 64)),
                         "{a}/adapters.safetensors: tensor 'layers.0.down.lora_A' is F32 [4, 8, 96], expected F32 "
                         "[4, 8, 64] (from manifest.json)"),  # files and tensors in name order
    "stage order": (lambda a: _edit_manifest(a, lambda m: m["layers"][0]["stages"].reverse()),
                    "{a}/manifest.json: field 'layers[0].stages[0].stage' must be 'qkv', found \"down\""),
    "routes of another top-k": (lambda a: _edit_manifest(a, lambda m: m["routing"].__setitem__("top_k", 3)),
                                "{a}/routes.safetensors: routing table [256, 2], expected [vocab_size, top_k] = [256, 3]"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_reader_refuses_with_one_line(case, runtime_build, runtime_lib, artifacts, tmp_path):
    art = _copy(artifacts["pregate-llama"], tmp_path / "out.native")
    breaks, message = REFUSALS[case]
    breaks(art)
    want = message.format(a=art)
    proc = check(runtime_build, art)
    assert (proc.returncode, proc.stderr) == (1, f"error: {want}\n")
    status, text = open_through_c_api(runtime_lib, art)
    assert (status, text) == (2, want)  # ADAFUSE_ERR_FILE


def test_a_file_is_not_an_artifact(runtime_build, tmp_path):
    (tmp_path / "x.native").write_text("{}")
    proc = check(runtime_build, tmp_path / "x.native")
    assert proc.stderr == (f"error: {tmp_path}/x.native: expected a native artifact directory (adafuse-export convert "
                           "--backend native CKPT OUT.native), found a file\n")


# ---- FP8 base weights (--weights fp8) -------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp8_artifacts(artifacts, tmp_path_factory) -> tuple[Path, Path]:
    """pregate-llama in bfloat16 with FP8 stage weights, and its bfloat16 twin."""
    root = tmp_path_factory.mktemp("fp8")
    ckpt = ckpt_of(artifacts["pregate-llama"])
    for name, weights in (("fp8", "fp8"), ("bf16", "dtype")):
        (root / f"{name}.native").mkdir()
        native.write_artifact(ckpt, root / f"{name}.native", "bfloat16", max_batch=2, max_seq=64, weights=weights)
    return root / "fp8.native", root / "bf16.native"


def test_fp8_stage_weights_are_the_dtype_weights_quantized(fp8_artifacts):
    from adafuse_export.quantize import quantize_fp8_per_channel

    fp8, bf16 = fp8_artifacts
    t8, t16 = tensors(fp8), tensors(bf16)
    stage = [n for n in t16 if re.fullmatch(r"layers\.\d+\.(qkv|o|gate_up|down)\.weight", n)]
    assert len(stage) == 8
    for n in stage:
        q, scale = quantize_fp8_per_channel(t16[n], n)
        assert t8[n].dtype == torch.float8_e4m3fn and torch.equal(t8[n].view(torch.uint8), q.view(torch.uint8)), n
        assert torch.equal(t8[n.replace(".weight", ".weight_scale")], scale), n
    others = set(t16) - set(stage)
    assert set(t8) == others | set(stage) | {n.replace(".weight", ".weight_scale") for n in stage}
    for n in others:  # norms, embedding, head, adapters, RoPE tables: as in the dtype artifact
        assert torch.equal(t8[n], t16[n]), n
    assert json.loads((fp8 / native.MANIFEST).read_text())["model"]["weights"] == "fp8_e4m3"
    assert json.loads((bf16 / native.MANIFEST).read_text())["model"]["weights"] == "dtype"


def test_reader_checks_fp8_weights_and_plans_their_bytes(runtime_build, runtime_lib, fp8_artifacts, tmp_path):
    fp8, _ = fp8_artifacts
    proc = check(runtime_build, fp8)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == (f"{fp8}: llama bfloat16 with FP8 e4m3 weights, 2 layers, routing pregate "
                                           f"(4 experts, top-2), 42 tensors checked, kernel ABI {native.ABI_VERSION}")
    plan = dict(re.findall(r"plan: (weights) (\d+) bytes", proc.stdout))
    assert int(plan["weights"]) == sum(_safetensors_bytes(fp8 / f)[0] for f in (native.WEIGHTS, native.ADAPTERS))
    assert open_through_c_api(runtime_lib, fp8)[0] == 5  # fused: every check passed, then the device
    # switch takes FP8 weights (16-bit merged copies beside them): refused only for this artifact's batch of 2
    assert open_through_c_api(runtime_lib, fp8, b"switch") == (
        1, f"{fp8}: strategy 'switch' merges one sequence's experts into the weights, so it runs batch 1, found "
           "runtime.max_batch 2 (convert with --max-batch 1, or use strategy 'fused')")
    art = _copy(fp8, tmp_path / "batch1.native")
    _edit_manifest(art, lambda m: m["runtime"].__setitem__("max_batch", 1))
    assert open_through_c_api(runtime_lib, art, b"switch")[0] == 5  # every check passed, then the device
    # the manifest and the tensors must agree on the weights' form
    art = _copy(fp8, tmp_path / "dtype.native")
    _edit_manifest(art, lambda m: m["model"].__setitem__("weights", "dtype"))
    assert check(runtime_build, art).stderr == (
        f"error: {art}/weights.safetensors: tensor 'layers.0.down.weight' is F8_E4M3 [64, 96], expected BF16 [64, 96] "
        "(from manifest.json)\n")
    art = _copy(fp8, tmp_path / "f32.native")
    _edit_manifest(art, lambda m: m["model"].__setitem__("dtype", "float32"))
    assert check(runtime_build, art).stderr == (
        f"error: {art}/manifest.json: field 'model.weights' must be 'dtype' with model.dtype float32 (FP8 weights run "
        "with 16-bit activations), found \"fp8_e4m3\"\n")


def test_fp8_weights_refusals(artifacts, tmp_path):
    from adafuse_export.convert import convert
    from adafuse_export.errors import AdafuseError

    ckpt = ckpt_of(artifacts["pregate-llama"])
    (tmp_path / "a.native").mkdir()
    with pytest.raises(AdafuseError) as e:
        native.write_artifact(ckpt, tmp_path / "a.native", "float32", max_batch=1, max_seq=64, weights="fp8")
    assert str(e.value) == ("--weights fp8 keeps the activations in --dtype, which must then be float16 or bfloat16 (the "
                            "kernels run FP8 weights with 16-bit activations), got --dtype float32")
    assert not any((tmp_path / "a.native").iterdir())  # refused before anything is written
    with pytest.raises(AdafuseError) as e:  # engines take FP8 weights too (tests/test_onnx_fp8.py), the same rule
        convert(artifacts["pregate-llama"].with_suffix(""), tmp_path / "x.engine", backend="tensorrt-rtx", weights="fp8")
    assert str(e.value) == ("--weights fp8 keeps the activations in --dtype, which must then be float16 or bfloat16 (the "
                            "kernels run FP8 weights with 16-bit activations), got --dtype float32")
    assert not list(tmp_path.glob("x.*"))


# ---- the command ---------------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "adafuse_export", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_convert_backend_native_writes_replaces_and_refuses(example_dirs, tmp_path):
    out = tmp_path / "m.native"
    proc = _cli("convert", "--backend", "native", example_dirs["pregate"], out, "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].startswith(f"wrote {out}/ (")
    m = json.loads((out / native.MANIFEST).read_text())
    assert (m["model"]["dtype"], m["runtime"]) == ("bfloat16", {"max_batch": 1, "max_seq": 512})
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    again = _cli("convert", "--backend", "native", example_dirs["pregate"], out)
    assert again.returncode == 2 and f"{out}: directory is not empty; pass --force to overwrite" in again.stderr
    forced = _cli("convert", "--backend", "native", example_dirs["pregate"], out, "--force", "--max-seq", "64")
    assert forced.returncode == 0, forced.stderr
    assert json.loads((out / native.MANIFEST).read_text())["runtime"]["max_seq"] == 64
    (out / "notes.txt").write_text("mine")
    foreign = _cli("convert", "--backend", "native", example_dirs["pregate"], out, "--force")
    assert "holds 'notes.txt', which adafuse-export did not write" in foreign.stderr
    for args, message in ((["--backend", "native", example_dirs["pregate"], tmp_path / "m.engine"],
                           f"{tmp_path}/m.engine: the output name of --backend native must end in .native (a directory; "
                           "found '.engine')"),
                          (["--backend", "tensorrt", example_dirs["pregate"], tmp_path / "m.native"],
                           f"{tmp_path}/m.native: the output name must end in .engine (found '.native'); --backend native "
                           "writes a .native artifact"),
                          (["--backend", "native", example_dirs["pregate"], tmp_path / "p.native", "--strategy", "switch"],
                           "--strategy: not an option of --backend native (the native runtime chooses fused or switch "
                           "when it opens the artifact)")):
        proc = _cli("convert", *args)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "native" in _cli("convert", "--help").stdout
    fp8 = _cli("convert", "--backend", "native", example_dirs["pregate"], tmp_path / "f.native", "--weights", "fp8")
    assert fp8.returncode == 0, fp8.stderr
    assert "(float16, FP8 e4m3 base weights, kernel ABI" in fp8.stdout
    assert json.loads((tmp_path / "f.native" / native.MANIFEST).read_text())["model"]["weights"] == "fp8_e4m3"
    bad = _cli("convert", "--backend", "native", example_dirs["pregate"], tmp_path / "g.native", "--weights", "fp8",
               "--dtype", "float32")
    assert bad.returncode == 2 and "--weights fp8 keeps the activations in --dtype" in bad.stderr, bad.stderr
    assert not (tmp_path / "g.native").exists()


def test_native_writer_peak_memory_is_a_fraction_of_the_checkpoint(example_dirs, tmp_path, monkeypatch):
    """The test_onnx_streaming pattern: a ~0.5 GB bf16 checkpoint, peak RSS growth over the tiny example's
    run under 25% of the checkpoint (holding the model once would be 100%)."""
    import test_onnx_streaming as streaming

    monkeypatch.setitem(streaming.synthetic_checkpoint.SHAPES, "medium-test", streaming.MEDIUM)
    ckpt_dir = tmp_path / "medium"
    streaming.synthetic_checkpoint.write_synthetic(ckpt_dir, "medium-test", experts=4, rank=8, shard_bytes=200 << 20,
                                                   log=lambda *_: None)
    size = sum(p.stat().st_size for p in ckpt_dir.glob("*.safetensors"))
    base = streaming._peak_rss(["convert", "--backend", "native", str(example_dirs["pregate"]), str(tmp_path / "t.native"),
                                "--dtype", "bfloat16"])
    peak = streaming._peak_rss(["convert", "--backend", "native", str(ckpt_dir), str(tmp_path / "m.native"),
                                "--dtype", "bfloat16"])
    written = (tmp_path / "m.native" / native.WEIGHTS).stat().st_size
    assert written > 0.9 * size - (tmp_path / "m.native" / native.ADAPTERS).stat().st_size  # the weights went through
    growth = peak - base
    print(f"peak RSS {peak / 2**20:.0f} MiB, baseline {base / 2**20:.0f} MiB, checkpoint {size / 2**20:.0f} MiB")
    assert growth < 0.25 * size, f"growth {growth / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB checkpoint"


def test_gemm_choice_at_open(runtime_lib, artifacts, tmp_path, monkeypatch):
    """ADAFUSE_NATIVE_GEMM at open (runtime/README.md, 'The native backend'): cuBLASLt required and absent is refused
    in one line naming where it looked, before the device; absent under auto (the default) or not wanted, the open goes
    on to the device (the kernel library's GEMMs); float32 never uses cuBLASLt, so it is never required there."""
    bf16 = tmp_path / "bf16.native"
    bf16.mkdir()
    native.write_artifact(ckpt_of(artifacts["pregate-llama"]), bf16, "bfloat16", max_batch=2, max_seq=64)
    monkeypatch.setenv("ADAFUSE_CUBLASLT_LIB", "/nonexistent/libcublasLt.so")
    monkeypatch.setenv("ADAFUSE_NATIVE_GEMM", "cublaslt")
    status, message = open_through_c_api(runtime_lib, bf16)
    assert status == 5 and message.startswith("cuBLASLt: cannot load /nonexistent/libcublasLt.so: "), message
    assert message.endswith(" (ADAFUSE_CUBLASLT_LIB) (ADAFUSE_NATIVE_GEMM=cublaslt requires it)") and "\n" not in message
    device = "CUDA device 0 (running {} needs an NVIDIA GPU): "
    status, message = open_through_c_api(runtime_lib, artifacts["pregate-llama"])  # float32
    assert status == 5 and message.startswith(device.format(artifacts["pregate-llama"])), message
    for choice in ("auto", "kernels"):
        monkeypatch.setenv("ADAFUSE_NATIVE_GEMM", choice)
        status, message = open_through_c_api(runtime_lib, bf16)
        assert status == 5 and message.startswith(device.format(bf16)), (choice, message)
    monkeypatch.setenv("ADAFUSE_NATIVE_GEMM", "cublas")
    assert open_through_c_api(runtime_lib, bf16) == (
        1, "ADAFUSE_NATIVE_GEMM 'cublas' is unknown (expected auto, cublaslt or kernels)")
