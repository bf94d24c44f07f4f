"""Property tests: the safetensors and config readers either succeed or raise AdafuseError."""
from __future__ import annotations

import json
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adafuse_export.errors import AdafuseError
from adafuse_export.spec import AdapterSpec, ModelSpec
from adafuse_export.tensors import read_json, read_safetensors_header

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 1 << 40) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)

entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "BF16", "F16", "I32", "Q4", 7, None]),
    "shape": st.one_of(st.lists(st.integers(-2, 6), max_size=3), st.text(max_size=3)),
    "data_offsets": st.one_of(st.lists(st.integers(-4, 300), min_size=0, max_size=3), st.none()),
})


@SETTINGS
@given(header=st.dictionaries(st.text(min_size=1, max_size=6), entry | json_values, max_size=4),
       data=st.binary(max_size=300), lie=st.integers(-3, 3))
def test_safetensors_header_never_crashes(tmp_path, header, data, lie):
    raw = json.dumps(header).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", max(0, len(raw) + lie)) + raw + data)
    try:
        tensors, _, start = read_safetensors_header(path)
    except AdafuseError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return
    for info in tensors.values():  # whatever parses is self-consistent
        assert info.nbytes <= len(data) + max(0, -lie) + 8


@SETTINGS
@given(blob=st.binary(max_size=64))
def test_safetensors_random_bytes(tmp_path, blob):
    path = tmp_path / "y.safetensors"
    path.write_bytes(blob)
    try:
        read_safetensors_header(path)
    except AdafuseError as e:
        assert str(path) in str(e)


@SETTINGS
@given(cfg=st.dictionaries(st.sampled_from([
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps", "tie_word_embeddings", "hidden_act",
    "rope_scaling", "rope_parameters", "attention_bias", "sliding_window"]), json_values, max_size=14))
def test_model_config_never_crashes(cfg):
    try:
        ModelSpec.from_hf_config(cfg, "config.json")
    except AdafuseError as e:
        assert str(e).startswith("config.json: ")


@SETTINGS
@given(cfg=st.dictionaries(st.sampled_from([
    "format_version", "num_experts", "top_k", "r", "lora_alpha", "target_modules", "static_modules", "routing",
    "router_kind", "normalize_topk", "expert_kind", "use_rslora", "pregate_input", "num_experts_per_layer",
    "rank_pattern", "alpha_pattern"]), json_values, max_size=16))
def test_adapter_config_never_crashes(cfg):
    try:
        AdapterSpec.from_json(cfg, "adafuse_config.json", num_layers=2)
    except AdafuseError as e:
        assert str(e).startswith("adafuse_config.json: ")


@SETTINGS
@given(blob=st.binary(max_size=64))
def test_read_json_random_bytes(tmp_path, blob):
    path = tmp_path / "c.json"
    path.write_bytes(blob)
    try:
        read_json(path)
    except AdafuseError as e:
        assert str(e).startswith(str(path))


def test_non_finite_numbers_rejected():
    import math

    import pytest

    base = {"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    with pytest.raises(AdafuseError, match="key 'rope_theta' must be a finite number"):
        ModelSpec.from_hf_config({**base, "rope_theta": math.nan}, "config.json")
    with pytest.raises(AdafuseError, match="key 'rms_norm_eps' must be a finite number"):
        ModelSpec.from_hf_config({**base, "rms_norm_eps": math.inf}, "config.json")
    with pytest.raises(AdafuseError, match="key 'lora_alpha' must be a finite number"):
        AdapterSpec.from_json({"format_version": 1, "num_experts": 2, "top_k": 1, "r": 2, "lora_alpha": math.nan,
                               "target_modules": ["q_proj"], "routing": "pregate"}, "adafuse_config.json", 1)
