"""families/rope.py against transformers' own RoPE (modeling_rope_utils and the models' rotary modules).

Every variant's frequencies and attention factor are compared bit for bit with what transformers computes
from the same config.json, in both spellings real checkpoints carry: the published one (top-level
rope_theta + rope_scaling with `type` or `rope_type`) and transformers 5's `rope_parameters`. Parameters
are drawn at random (seeded) within the ranges real checkpoints use.
"""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from adafuse_export.errors import AdafuseError
from adafuse_export.families import rope as rope_mod
from adafuse_export.spec import ModelSpec

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

DIMS = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
CONFIGS = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config, "phi3": transformers.Phi3Config, "gemma2": transformers.Gemma2Config,
           "gemma3_text": transformers.Gemma3TextConfig}


def draw(kind: str, rng: random.Random, half: int) -> dict:
    """Random parameters of one variant, in the ranges published checkpoints use."""
    if kind == "default":
        return {}
    if kind in ("linear", "dynamic"):
        return {"factor": rng.choice([2.0, 4.0, 8.0, rng.uniform(1.1, 16)])}
    if kind == "llama3":
        low = rng.choice([1.0, rng.uniform(0.5, 2)])
        return {"factor": rng.choice([8.0, 32.0, rng.uniform(2, 16)]), "low_freq_factor": low,
                "high_freq_factor": low + rng.choice([3.0, rng.uniform(0.5, 8)]),
                "original_max_position_embeddings": rng.choice([8192, 16, 64])}
    if kind == "yarn":
        p = {"factor": rng.choice([4.0, rng.uniform(1.5, 40)]), "original_max_position_embeddings": rng.choice([32768, 16, 64])}
        for key, lo, hi in (("beta_fast", 8, 64), ("beta_slow", 0.5, 4), ("mscale", 0.5, 2), ("mscale_all_dim", 0.5, 2)):
            if rng.random() < 0.4:
                p[key] = rng.uniform(lo, hi)
        if rng.random() < 0.3:
            p["truncate"] = rng.random() < 0.5
        if rng.random() < 0.2:
            p["attention_factor"] = rng.uniform(0.8, 1.5)
        return p
    if kind == "longrope":
        p = {"short_factor": [rng.uniform(1, 1.2) for _ in range(half)],
             "long_factor": [rng.uniform(1, 40) for _ in range(half)]}
        if rng.random() < 0.3:
            p["attention_factor"] = rng.uniform(1, 1.5)
        return p
    raise AssertionError(kind)


def both_spellings(family: str, kind: str, params: dict, theta: float, extra: dict) -> list[tuple[str, dict]]:
    """(name, config.json dict) in the published spelling and in transformers 5's."""
    published = {**DIMS, **extra, "model_type": family, "rope_theta": theta}
    if kind != "default":
        key = "type" if kind in ("yarn", "longrope", "linear") else "rope_type"  # both keys occur in the wild
        published["rope_scaling"] = {key: kind, **params}
    modern = {**DIMS, **extra, "model_type": family,
              "rope_parameters": {"rope_type": kind, "rope_theta": theta, **params}}
    return [("published", published), ("transformers-5", modern)]


def hf_config(cfg: dict):
    return CONFIGS[cfg["model_type"]](**{k: v for k, v in cfg.items() if k != "model_type"})


CASES = [(family, kind) for family in ("llama", "mistral", "qwen2", "qwen3")
         for kind in ("default", "linear", "dynamic", "llama3", "yarn")] + [("phi3", "default"), ("phi3", "longrope")]


@pytest.mark.parametrize("family,kind", CASES)
def test_frequencies_equal_transformers(family, kind):
    rng = random.Random(f"{family}-{kind}")
    for trial in range(6):
        theta = rng.choice([1e4, 5e5, 1e6, rng.uniform(100, 1e7)])
        extra = {}
        if family == "phi3" and kind == "longrope":
            extra["original_max_position_embeddings"] = rng.choice([16, 64, 4096])
        params = draw(kind, rng, 8)
        for spelling, cfg in both_spellings(family, kind, params, theta, extra):
            # a config.json as a file would carry it (JSON numbers, no tuples)
            cfg = json.loads(json.dumps(cfg))
            spec = ModelSpec.from_hf_config(cfg, "config.json")
            hf = hf_config(json.loads(json.dumps(cfg)))
            init = ROPE_INIT_FUNCTIONS.get(hf.rope_parameters["rope_type"])
            if init is None:  # default: the models' own compute_default_rope_parameters
                d = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
                expected, factor = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float) / d)), 1.0
            else:
                expected, factor = init(hf)
            what = f"{family} {kind} {spelling} trial {trial}: {cfg.get('rope_scaling') or cfg.get('rope_parameters')}"
            assert spec.rope.kind == hf.rope_parameters["rope_type"], what
            assert torch.equal(spec.rope.inv_freq(), expected), what
            assert spec.rope.attention_factor == pytest.approx(factor, rel=1e-15, abs=0), what
            if kind == "longrope":
                original = hf.rope_parameters["original_max_position_embeddings"]
                long, _ = init(hf, seq_len=original + 1)
                assert spec.rope.switch_at == original and torch.equal(spec.rope.long_inv_freq(), long), what


def test_gemma3_per_layer_type_both_spellings():
    """Gemma 3 4B+: `linear` factor 8 on the full-attention layers only, the local base on the sliding ones."""
    published = {**DIMS, "model_type": "gemma3_text", "head_dim": 16, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                 "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 4,
                 "layer_types": ["sliding_attention", "full_attention"]}
    modern = {**{k: v for k, v in published.items() if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling")},
              "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    for cfg in (published, modern):
        spec = ModelSpec.from_hf_config(json.loads(json.dumps(cfg)), "config.json")
        hf = hf_config(json.loads(json.dumps(cfg)))
        rotary = transformers.models.gemma3.modeling_gemma3.Gemma3RotaryEmbedding(hf)
        assert torch.equal(spec.rope.inv_freq(), rotary.full_attention_inv_freq)
        assert torch.equal(spec.sliding_rope.inv_freq(), rotary.sliding_attention_inv_freq)
        assert spec.layer_rope(0) is spec.sliding_rope and spec.layer_rope(1) is spec.rope
        assert spec.rope.kind == "linear" and spec.sliding_rope.kind == "default"


@pytest.mark.parametrize("positions", [[[0, 1, 2, 3]], [[5, 6, 7, 8]], [[15]], [[16]], [[40, 41]]])
def test_cos_sin_equal_the_rotary_module(positions):
    """LongRoPE through transformers' Phi-3 rotary module (its per-call switch at original_max_position_embeddings
    and attention factor) against Rope.cos_sin, on both sides of the switch."""
    cfg = {**DIMS, "model_type": "phi3", "original_max_position_embeddings": 16, "rope_theta": 1e4,
           "rope_scaling": {"type": "longrope", "short_factor": [1.0 + i / 50 for i in range(8)],
                            "long_factor": [1.0 + 3 * i for i in range(8)]}}
    spec = ModelSpec.from_hf_config(cfg, "config.json")
    rotary = transformers.models.phi3.modeling_phi3.Phi3RotaryEmbedding(hf_config(cfg))
    pos = torch.tensor(positions)
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), pos)
    got_cos, got_sin = spec.rope.cos_sin(pos, torch.float32)
    assert torch.equal(got_cos, cos) and torch.equal(got_sin, sin)
    assert spec.rope.attention_factor == pytest.approx(math.sqrt(1 + math.log(256 / 16) / math.log(16)))


def test_rows_switch_independently():
    """A batch row past switch_at takes the long set, the other keeps the short one."""
    cfg = {**DIMS, "model_type": "phi3", "original_max_position_embeddings": 16,
           "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8}}
    rope = ModelSpec.from_hf_config(cfg, "config.json").rope
    both, _ = rope.cos_sin(torch.tensor([[3, 4], [20, 21]]), torch.float32)
    short, _ = rope.cos_sin(torch.tensor([[3, 4]]), torch.float32)
    long, _ = rope.cos_sin(torch.tensor([[20, 21]]), torch.float32)
    assert torch.equal(both[0], short[0]) and torch.equal(both[1], long[0])


def test_rope_scaling_wins_over_rope_parameters():
    """transformers replaces rope_parameters by a rope_scaling beside it: so do we (never silently dropped)."""
    cfg = {**DIMS, "model_type": "llama", "rope_parameters": {"rope_type": "default", "rope_theta": 1e4},
           "rope_theta": 5e5, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}
    spec = ModelSpec.from_hf_config(cfg, "config.json")
    hf = hf_config(cfg)
    assert spec.rope.kind == hf.rope_parameters["rope_type"] == "linear"
    assert torch.equal(spec.rope.inv_freq(), ROPE_INIT_FUNCTIONS["linear"](hf)[0])


def test_phi3_renames_older_longrope_names():
    for old in ("su", "yarn"):
        cfg = {**DIMS, "model_type": "phi3", "rope_scaling": {"type": old, "short_factor": [1.0] * 8,
                                                              "long_factor": [2.0] * 8,
                                                              "original_max_position_embeddings": 4096}}
        assert ModelSpec.from_hf_config(cfg, "config.json").rope.kind == hf_config(cfg).rope_parameters["rope_type"] \
            == "longrope"


@pytest.mark.parametrize("cfg,message", [
    ({"rope_scaling": {"rope_type": "proportional", "factor": 2.0}},
     "rope_scaling rope type 'proportional' is not supported (expected one of default, linear, dynamic, llama3, yarn, "
     "longrope)"),
    ({"rope_scaling": {"rope_type": "linear"}}, "rope_scaling needs 'factor' for rope type 'linear'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 1e300}}, "rope_scaling 'factor' must be in [1e-06, 1e+06], found 1e+300"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "8"}}, "rope_scaling 'factor' must be a finite number, found '8'"),
    ({"rope_theta": 1e-300}, "key 'rope_theta' must be a positive number whose frequencies theta^(-2i/d) "
                             "stay within float32 (1e-30 to 1e30), found 1e-300"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}},
     "rope_parameters 'rope_theta' must be a positive number"),
    ({"model_type": "gemma3_text", "rope_local_base_freq": 0}, "key 'rope_local_base_freq' must be a positive number"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}},
     "rope_scaling 'high_freq_factor' (1) must be larger than 'low_freq_factor' (4)"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "attention_factor": 1e9}},
     "rope_scaling attention factor must be in (0, 65504] (the tables are stored in the model dtype), found 1000000000.0"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "truncate": "no"}},
     "rope_scaling 'truncate' must be true or false, found 'no'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0}},
     "rope_scaling 'original_max_position_embeddings' must be a positive integer, found 0"),
    ({"model_type": "phi3", "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 7, "long_factor": [1.0] * 8}},
     "rope_scaling 'short_factor' must be a list of 8 numbers (rotary dimensions / 2), found 7 values"),
    ({"model_type": "phi3", "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8,
                                             "long_factor": [1.0] * 7 + [float("nan")]}},
     "rope_scaling 'long_factor'[7] must be a number in [1e-06, 1e+06], found nan"),
    ({"model_type": "phi3", "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
     "rope_scaling rope type 'linear' is not supported for model_type 'phi3' (expected one of default, longrope)"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"}}},
     "rope_parameters keyed by layer type (full_attention) is not supported for model_type 'llama'"),
    ({"model_type": "gemma3_text", "rope_parameters": {"rope_type": "default"}},
     "rope_parameters must be keyed by layer type (full_attention, sliding_attention) for model_type 'gemma3_text'"),
])
def test_refusals_name_the_setting(cfg, message):
    full = {**DIMS, "model_type": "llama", **cfg}
    with pytest.raises(AdafuseError) as err:
        ModelSpec.from_hf_config(full, "config.json")
    assert str(err.value).startswith(f"config.json: {message}"), str(err.value)


def test_every_variant_is_tested():
    tested = {kind for _, kind in CASES}
    assert tested == set(rope_mod.variants()), "a registered RoPE variant without a comparison with transformers"
