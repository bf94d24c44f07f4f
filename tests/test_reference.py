"""The PyTorch reference against Hugging Face transformers, and its own invariants."""
from __future__ import annotations

import pytest
import torch

from adafuse_export.converters import load_checkpoint
from adafuse_export.examples import make_example
from adafuse_export.reference import ReferenceModel, lora_delta

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("family,tied", [("llama", False), ("mistral", False), ("qwen2", True), ("llama", True)])
def test_base_matches_transformers(tmp_path, family, tied):
    make_example(tmp_path, "pregate", family=family, seed=3, config={"tie_word_embeddings": tied})
    ckpt = load_checkpoint(tmp_path)
    ref = ReferenceModel(ckpt, adapters=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, ckpt.model.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits
    got = ref(ids).logits
    assert (got - expected).abs().max().item() < 1e-4
    # Greedy tokens agree too (HF generate with the same KV-cache semantics).
    with torch.no_grad():
        hf_gen = hf.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    gen, _ = ref.generate(ids[:1], 6)
    assert gen.tolist() == hf_gen.tolist()


def test_sliding_window_matches_transformers(tmp_path):
    make_example(tmp_path, "pregate", family="mistral", seed=4, config={"sliding_window": 4})
    ckpt = load_checkpoint(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
    assert (ReferenceModel(ckpt, adapters=False)(ids).logits - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", ["pregate", "pregate-ffn", "mola", "loramoe", "mixlora", "lora"])
def test_kv_cache_decode_equals_full_forward(example_dirs, kind):
    model = ReferenceModel(load_checkpoint(example_dirs[kind]))
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    full = model(ids)
    out = model(ids[:, :5])
    logits = [out.logits]
    for t in range(5, 9):
        out = model(ids[:, t:t + 1], out.cache)
        logits.append(out.logits)
    assert (torch.cat(logits, 1) - full.logits).abs().max().item() < 1e-4
    # adapters change the output
    assert (full.logits - ReferenceModel(load_checkpoint(example_dirs[kind]), adapters=False)(ids).logits).abs().max() > 1e-2


def test_routing_table_is_the_pregate(example_dirs):
    model = ReferenceModel(load_checkpoint(example_dirs["pregate"]))
    table_ids, table_gates = model.routing_table(chunk=100)  # several chunks
    assert table_ids.shape == (256, 2) and table_ids.dtype == torch.int32
    ids = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(5))
    out = model(ids)
    assert torch.equal(out.expert_ids, table_ids[ids].long())
    assert torch.allclose(out.gates, table_gates[ids], atol=1e-6)
    assert torch.allclose(table_gates.sum(-1), torch.ones(256), atol=1e-5)  # renormalised top-k
    # Forcing the table's routes reproduces the logits.
    forced = model(ids, routes=(table_ids[ids], table_gates[ids]))
    assert (forced.logits - out.logits).abs().max().item() < 1e-5


def test_routing_table_refused_when_not_exact(example_dirs):
    from adafuse_export.errors import AdafuseError

    model = ReferenceModel(load_checkpoint(example_dirs["pregate-ffn"]))
    with pytest.raises(AdafuseError, match="no routing table: its pre-gate reads .mlp_norm_0."):
        model.routing_table()


def test_pregate_equals_manual_math(example_dirs):
    """y = W x + s * sum_k g_k B_k A_k x with one route for every layer, checked by hand on q_proj of layer 1."""
    ckpt = load_checkpoint(example_dirs["pregate"])
    model = ReferenceModel(ckpt, dtype=torch.float64)
    x = torch.randn(5, 64, dtype=torch.float64)
    ids = torch.tensor([[0, 3], [1, 2], [3, 1], [2, 0], [1, 3]])
    gates = torch.rand(5, 2, dtype=torch.float64)
    A, B = model.a["layers.1.q_proj.lora_A"], model.a["layers.1.q_proj.lora_B"]
    W = model.w["model.layers.1.self_attn.q_proj.weight"]
    s = ckpt.adapter.site_scale("layers.1.q_proj")
    expected = torch.stack([W @ x[n] + s * sum(gates[n, j] * B[ids[n, j]] @ (A[ids[n, j]] @ x[n]) for j in range(2))
                            for n in range(5)])
    got = model._adapted(x, 1, "q_proj", (ids, gates))
    assert torch.allclose(got, expected, atol=1e-10)
    assert torch.allclose(lora_delta(x, A, B, ids, gates, s), expected - x @ W.T, atol=1e-10)


def test_bfloat16_reference_tracks_float32(example_dirs):
    ckpt = load_checkpoint(example_dirs["pregate"])
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(6))
    ref32 = ReferenceModel(ckpt)(ids).logits
    ref16 = ReferenceModel(ckpt, dtype=torch.bfloat16)(ids).logits
    assert torch.linalg.norm(ref16 - ref32) / torch.linalg.norm(ref32) < 5e-2


def test_router_ties_go_to_the_lower_expert_id():
    """ONNX TopK's rule for equal values; a zero input (e.g. a zero pad embedding) routes uniformly."""
    from adafuse_export.reference import route_topk

    weight = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    x = torch.zeros(3, 8)
    x[1] = torch.randn(8, generator=torch.Generator().manual_seed(1))
    ids, gates = route_topk(x, weight, None, 3, normalize=True)
    assert ids[0].tolist() == [0, 1, 2] and ids[2].tolist() == [0, 1, 2]
    assert torch.allclose(gates[0], torch.full((3,), 1 / 3))
    assert ids[1].tolist() == torch.topk(x[1] @ weight.T, 3).indices.tolist()  # no ties: the plain top-k
