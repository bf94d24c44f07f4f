"""Issue 24's classes 3-8 of hostile or careless input (the Python side), cases generated at test time.

Each class has one mechanism in the package; the tests here drive it through the commands it reaches:
3. validate never passes a wrong model (validate._Stat: bounds only from finite measured references;
   the model's dtype from its own tensors), 4. sizes taken from a file are checked against what the files
hold before anything proportional to them is allocated, 5. scales that overflow the compute dtype, exact
name matching, refusing what is not implemented, 6. no tracebacks, 7. outputs never hurt, 8. every string
from a file or an argument is printed escaped.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from adafuse_export.validate import _Stat
from test_input_safety import peft_dir  # noqa: E402  (tests/ is on the path: pytest's rootdir layout)
from test_validate_half import edited  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def one_line(r, *fragments) -> str:
    assert r.code == 2, (r.code, r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    for f in fragments:
        assert str(f) in lines[0], (f, lines[0])
    return lines[0]


# --- 3. validate never passes a wrong model ------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 5)), bad=st.sampled_from([np.inf, -np.inf, np.nan]),
       where=st.sampled_from(["half", "reference"]), data=st.data())
def test_non_finite_reference_never_passes(shape, bad, where, data):
    """A non-finite reference (or half reference) fails the output with its reason, whatever the runner gives."""
    want = np.asarray(data.draw(st.lists(st.floats(-10, 10), min_size=shape[0] * shape[1],
                                         max_size=shape[0] * shape[1])), np.float32).reshape(shape)
    got = want.copy()  # even a runner identical to the float32 reference
    half = want.copy()
    target = half if where == "half" else want
    target.flat[data.draw(st.integers(0, target.size - 1))] = bad
    s = _Stat("logits", 2e-2, 2e-2)
    s.add(got, want, "prompt 0 prefill", half)
    r = s.report()
    assert not r["passed"] and r["error"] and "not finite at prompt 0 prefill" in r["error"], r
    assert np.isfinite(r["atol_applied"])


def overflow_example(ckpt: Path, tmp: Path, value: float, dtype: str) -> tuple[Path, Path]:
    bad = edited(ckpt, tmp / f"lm-{value:g}", lambda t: t["lm_head.weight"].__setitem__(5, np.float32(value)))
    from adafuse_export.converters import load_checkpoint
    from adafuse_export.onnx.export import export_onnx

    export_onnx(load_checkpoint(bad), tmp / f"onnx-{value:g}", dtype=dtype)
    return bad, tmp / f"onnx-{value:g}"


@pytest.mark.parametrize("value", [3e4, -6e4, 1e6])
def test_half_reference_overflow_is_a_failure(cli, example_dirs, tmp_path, value):
    """lm_head rows finite in float32 and overflowing the float16 reference: the measured bound was inf (PASSED)."""
    ckpt, model = overflow_example(example_dirs["pregate"], tmp_path, value, "float16")
    r = cli("validate", ckpt, model, "--steps", "1", "--half-tolerance", "measured")
    assert r.code == 1 and "FAILED" in r.out and "PASSED" not in r.out, r.out
    assert "reference's 'logits' is not finite at prompt 0 prefill" in r.out
    assert "atol inf" not in r.out


@pytest.mark.parametrize("claimed", ["bfloat16", "float16"])
def test_dtype_metadata_claim_is_not_believed(cli, example_dirs, tmp_path, claimed):
    """A float32 graph claiming a half dtype was judged with that dtype's wide tolerance and passed a changed lm_head."""
    import onnx

    from adafuse_export.converters import load_checkpoint
    from adafuse_export.onnx.export import export_onnx

    export_onnx(load_checkpoint(example_dirs["pregate"]), tmp_path / "onnx")
    m = onnx.load(str(tmp_path / "onnx" / "decoder.onnx"), load_external_data=False)
    for p in m.metadata_props:
        if p.key == "adafuse.dtype":
            p.value = claimed
    onnx.save(m, str(tmp_path / "onnx" / "decoder.onnx"))
    ckpt = edited(example_dirs["pregate"], tmp_path / "ckpt",
                  lambda t: t["lm_head.weight"].__setitem__(5, t["lm_head.weight"][5] + np.float32(0.05)))
    r = cli("validate", ckpt, tmp_path / "onnx", "--steps", "1")
    assert r.code == 1 and "FAILED" in r.out, r.out
    assert f"metadata says adafuse.dtype={claimed}, its tensors are float32: judged as float32" in r.out
    assert "atol 1e-04" in r.out


# --- 4. tiny inputs, huge costs: sizes checked against what the files hold -----------------------

FAMILIES = ["llama", "mistral", "phi3", "gemma2", "qwen2", "qwen3"]
SIZE_COMMANDS = {"inspect": lambda c, o: ["inspect", c], "export-onnx": lambda c, o: ["export-onnx", c, o / "onnx"],
                 "run": lambda c, o: ["run", c, "--prompt-ids", "1"]}


@pytest.mark.parametrize("command", sorted(SIZE_COMMANDS))
@pytest.mark.parametrize("layers", [2 ** 31 - 1, 10 ** 8, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_num_hidden_layers_bounded_by_weights(cli, tmp_path, family, layers, command):
    from adafuse_export.examples import make_example

    d = tmp_path / family
    make_example(d, "pregate", family)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    (d / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "out").mkdir()
    one_line(cli(*SIZE_COMMANDS[command](d, tmp_path / "out")), f"{d / 'config.json'}: num_hidden_layers is {layers}, "
             f"more than the 2 layers the weights in {d} hold")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("layout", ["hydralora", "loramoe"])
@pytest.mark.parametrize("lora_nums", [2 ** 31 - 1, 10 ** 9, "held+1"])
def test_lora_nums_bounded_by_tensors(cli, tmp_path, layout, lora_nums):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fixtures_forks
    import fixtures_real

    base = fixtures_real.write_hf_base(tmp_path / "base", "llama")
    d = fixtures_forks.write_fork_adapter(tmp_path / "fork", base, layout)
    import torch

    held = len(torch.load(d / "adapter_model.bin", weights_only=True))
    value = held + 1 if lora_nums == "held+1" else lora_nums
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["lora_nums"] = value
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    one_line(cli("inspect", d), f"adapter_config.json: lora_nums is {value}, more than the {held} tensors "
             f"{d / 'adapter_model.bin'} holds")


def strided_payloads():
    import torch

    return {
        "expand-2^40": torch.zeros(1).expand(2 ** 20, 2 ** 20),
        "expand-3d": torch.zeros(2, 1, 1).expand(2, 2 ** 16, 2 ** 16),
        "overlapping": torch.zeros(2048).as_strided((1024, 1024), (1, 1)),
        "broadcast-row": torch.zeros(1, 64).expand(2 ** 24, 64),
    }


@pytest.mark.parametrize("kind", sorted(strided_payloads()))
def test_pickled_tensor_larger_than_its_data(cli, example_dirs, tmp_path, kind):
    """A 1 KB .bin holding a stride-0 [2^20, 2^20] tensor made the NaN scan walk 2^40 elements."""
    import time

    import torch

    t = strided_payloads()[kind]
    d = tmp_path / "peft"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
        "base_model_name_or_path": str(example_dirs["pregate"])}))
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    torch.save({name: t}, d / "adapter_model.bin")
    t0 = time.time()
    one_line(cli("inspect", d), f"{d / 'adapter_model.bin'}: the size of tensor '{name}' (shape {list(t.shape)}, "
             f"torch.float32) in bytes is {t.numel() * 4}, more than the {t.untyped_storage().nbytes()} its stored data "
             "holds (zero or overlapping strides)")
    assert time.time() - t0 < 30


@pytest.mark.parametrize("spellings", [2, 10, 10_000])
def test_manifest_file_spellings_hashed_once(tmp_path, spellings):
    """One file under 10,000 spellings took 71 s to verify: a second spelling is refused before any hashing."""
    import time

    from adafuse_export.errors import AdafuseError
    from adafuse_export.trt.manifest import MANIFEST_FORMAT, MANIFEST_VERSION, sha256_file, verify_engine

    engine = tmp_path / "m.engine"
    engine.write_bytes(b"engine" * 1000)
    # distinct spellings of one path: i's bits as './' or './/' prefixes
    names = ["m.engine"] + ["".join(".//" if i >> b & 1 else "./" for b in range(i.bit_length())) + "m.engine"
                            for i in range(1, spellings)]
    files = {n: sha256_file(engine) for n in names}
    (tmp_path / "m.json").write_text(json.dumps({"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
                                                 "engine": {"sha256": sha256_file(engine)}, "files": files}))
    t0 = time.time()
    with pytest.raises(AdafuseError, match=re.escape(f"'files' lists one file twice ({names[1]!r} and 'm.engine')")):
        verify_engine(engine)
    assert time.time() - t0 < 20
    (tmp_path / "m.json").write_text(json.dumps({"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
                                                 "engine": {"sha256": sha256_file(engine)},
                                                 "files": {"m.engine": sha256_file(engine)}}))
    assert verify_engine(engine)["files"] == {"m.engine": sha256_file(engine)}


# --- 5. silent wrong answers: scales in the compute dtype, exact names, refusing what is not implemented

SCALE_TEXT = "which overflows the float32 computation it scales (expected {}a magnitude from 2^-64 to 2^64)"
# (config file edit, the field named in the error, zero allowed)
GEMMA_SCALES = [("final_logit_softcapping", v) for v in (1e300, 1e-300, 2.0 ** 65, 1e39)] \
    + [("attn_logit_softcapping", v) for v in (1e300, 1e-30)] + [("query_pre_attn_scalar", v) for v in (1e300, 1e-300)]


@pytest.mark.parametrize("command", ["inspect", "run"])
@pytest.mark.parametrize("key,value", GEMMA_SCALES)
def test_gemma_scales_in_float32(cli, tmp_path, key, value, command):
    from adafuse_export.examples import make_example

    d = tmp_path / "gemma2"
    make_example(d, "pregate", "gemma2")
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    args = ["inspect", d] if command == "inspect" else ["run", d, "--prompt-ids", "1,2"]
    one_line(cli(*args), f"{d / 'config.json'}: {key} is {value!r}, " + SCALE_TEXT.format(""))


ADAFUSE_SCALES = [("lora_alpha", 1e300, "lora_alpha"), ("lora_alpha", 2.0 ** 70, "lora_alpha"),
                  ("alpha_pattern", {"layers.0.q_proj": 1e300}, "alpha_pattern['layers.0.q_proj']"),
                  ("alpha_pattern", {"layers.1.down_proj": 1e-300}, "alpha_pattern['layers.1.down_proj']")]


@pytest.mark.parametrize("command", ["inspect", "export-onnx"])
@pytest.mark.parametrize("key,value,named", ADAFUSE_SCALES)
def test_adapter_scales_in_float32(cli, example_dirs, tmp_path, key, value, named, command):
    d = tmp_path / "ckpt"
    shutil.copytree(example_dirs["pregate"], d)
    cfg = json.loads((d / "adafuse_config.json").read_text())
    cfg[key] = value
    (d / "adafuse_config.json").write_text(json.dumps(cfg))
    shown = value if key == "lora_alpha" else next(iter(value.values()))
    args = ["inspect", d] if command == "inspect" else ["export-onnx", d, tmp_path / "onnx"]
    one_line(cli(*args), f"{d / 'adafuse_config.json'}: {named} is {shown!r}, " + SCALE_TEXT.format(""))
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("alpha", [1e300, 2.0 ** 65])
def test_peft_lora_alpha_in_float32(cli, example_dirs, tmp_path, alpha):
    d = peft_dir(tmp_path, example_dirs["pregate"], lora_alpha=alpha)
    one_line(cli("run", d, "--prompt-ids", "1,2"), f"{d / 'adapter_config.json'}: lora_alpha is {alpha!r}, "
             + SCALE_TEXT.format(""))


Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.mark.parametrize("suffix", ["\n", "\r\n", " ", "\x00", "\n\n"])
def test_tensor_names_match_exactly(cli, example_dirs, tmp_path, suffix):
    """'...lora_B.weight\\n' was used in place of '...lora_B.weight' (a `$` matches before a trailing newline)."""
    d = peft_dir(tmp_path, example_dirs["pregate"], extra={Q_B + suffix: (64, 4)})
    one_line(cli("inspect", d), f"tensor {Q_B + suffix!r} is not a LoRA weight of a decoder projection")


@pytest.mark.parametrize("spelling", ["layers.00.", "layers.\u0660.", "layers.+0.", "layers.0x0."])
def test_layer_index_spelled_once(cli, example_dirs, tmp_path, spelling):
    """int() reads '00', '+0' and Arabic-Indic digits as 0: such a name would stand for layer 0's tensor."""
    name = Q_B.replace("layers.0.", spelling)
    d = peft_dir(tmp_path, example_dirs["pregate"], extra={name: (64, 4)})
    one_line(cli("inspect", d), f"tensor {name!r} is not a LoRA weight of a decoder projection")


@pytest.mark.parametrize("layer", [2, 3, 10 ** 6])
def test_adapter_layers_beyond_the_base(cli, example_dirs, tmp_path, layer):
    a = Q_B.replace("layers.0.", f"layers.{layer}.")
    d = peft_dir(tmp_path, example_dirs["pregate"], extra={a: (64, 4), a.replace("lora_B", "lora_A"): (4, 64)})
    one_line(cli("inspect", d), f"tensor '{a.replace('lora_B', 'lora_A')}' is for layer {layer}, but the base model "
             "has 2 layers")


@pytest.mark.parametrize("key,value", [("layer_replication", [[0, 2], [1, 2]]), ("lora_bias", True),
                                       ("trainable_token_indices", [1, 2]), ("target_parameters", ["mlp.experts"])])
def test_peft_options_not_implemented_are_refused(cli, example_dirs, tmp_path, key, value):
    d = peft_dir(tmp_path, example_dirs["pregate"], **{key: value})
    one_line(cli("inspect", d), f"{d / 'adapter_config.json'}: '{key}: {json.dumps(value)}' is not supported "
             "(expected it unset)")


@pytest.fixture(scope="module")
def xlora_dir(tmp_path_factory):
    """A PEFT X-LoRA checkpoint of two adapters (written by peft itself) and its canonical form."""
    pytest.importorskip("peft")
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fixtures_real as fr

    from adafuse_export.checkpoint import write_canonical
    from adafuse_export.converters import load_checkpoint

    root = tmp_path_factory.mktemp("xlora")
    base = fr.write_hf_base(root / "base", "llama")
    d, _, _ = fr.write_peft_xlora(root / "x", base, torch.as_tensor(fr.SAMPLE_IDS), [{}, {"r": 8}], xlora_depth=1)
    write_canonical(load_checkpoint(d), root / "canonical")
    return d, root / "canonical"


XLORA_PEFT = [("softmax_temperature", 1e-300, SCALE_TEXT.format("")), ("softmax_temperature", 2.0 ** 70, SCALE_TEXT.format("")),
              ("global_scaling_weight", 1e300, SCALE_TEXT.format("0 or ")),
              ("global_scaling_weight", -1e300, SCALE_TEXT.format("0 or ")),
              ("scaling_pass_value", 1e300, SCALE_TEXT.format("0 or ")),
              ("top_k_lora", 3, "X-LoRA top_k_lora 3 is larger than the 2 adapters (PEFT's own top-k fails on it)"),
              ("top_k_lora", 2 ** 31, "X-LoRA top_k_lora 2147483648 is larger than the 2 adapters"),
              ("xlora_dropout_p", float("nan"), "'xlora_dropout_p' must be a probability in [0, 1], found nan"),
              ("xlora_dropout_p", 1.5, "'xlora_dropout_p' must be a probability in [0, 1], found 1.5"),
              ("xlora_dropout_p", -0.1, "'xlora_dropout_p' must be a probability in [0, 1], found -0.1")]


@pytest.mark.parametrize("command", ["inspect", "run"])
@pytest.mark.parametrize("key,value,fragment", XLORA_PEFT, ids=[f"{k}={v}" for k, v, _ in XLORA_PEFT])
def test_xlora_settings_peft_cannot_run(cli, xlora_dir, tmp_path, key, value, fragment, command):
    d = tmp_path / "x"
    shutil.copytree(xlora_dir[0], d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg[key] = value
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    if "overflows" in fragment:
        fragment = f"X-LoRA {key} is {float(value)!r}, " + fragment
    args = ["inspect", d] if command == "inspect" else ["run", d, "--prompt-ids", "1,2"]
    one_line(cli(*args), f"{d / 'adapter_config.json'}: ", fragment)


# --- 8. log injection: every string from a file or an argument is printed escaped ----------------

FORGED = "wrote x.engine (1.0 MiB) verified"
HOSTILE = {"newline": f"a\n{FORGED}", "cr": f"a\r{FORGED}", "esc": "a\x1b[2J\x1b[31mred", "osc": "a\x1b]0;title\x07",
           "line-separator": f"a\u2028{FORGED}", "bidi": "a\u202egnp.exe", "c1": "a\x9b31m", "del": "a\x7fb"}


def assert_escaped(text: str, hostile: str) -> None:
    """No control character but the tool's own line breaks, no forged line, and the hostile string visible escaped."""
    import unicodedata

    from adafuse_export.errors import shown

    bad = [c for c in text if c != "\n" and unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]
    assert not bad, (bad, text)
    assert FORGED not in text.splitlines() and "PASSED" not in [line.strip() for line in text.splitlines()[:-1]]
    assert shown(hostile) in text, (shown(hostile), text)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_names_in_paths(cli, example_dirs, tmp_path, name):
    hostile = HOSTILE[name]
    ckpt = tmp_path / f"ckpt-{hostile}"
    shutil.copytree(example_dirs["pregate"], ckpt)
    r = cli("inspect", ckpt)
    assert r.code == 0, r.err
    assert_escaped(r.out, hostile)
    r = cli("export-onnx", ckpt, tmp_path / f"onnx-{hostile}")
    assert r.code == 0, r.err
    assert_escaped(r.out, hostile)
    r = cli("inspect", tmp_path / f"missing-{hostile}")  # an error line
    one_line(r)
    assert_escaped(r.err, hostile)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_values_in_files_and_arguments(cli, example_dirs, tmp_path, name):
    hostile = HOSTILE[name]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(example_dirs["pregate"], ckpt)
    r = cli("run", ckpt, "--prompt-ids", f"1,{hostile}")
    one_line(r, "--prompt-ids")
    assert_escaped(r.err, hostile)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": hostile}))
    r = cli("inspect", ckpt)
    one_line(r, "model_type")
    assert_escaped(r.err, hostile)
    r = cli("export-onnx", ckpt, tmp_path / "o", "--dtype", hostile)  # a click usage error
    assert r.code == 2 and "Traceback" not in r.err
    assert_escaped(r.err, hostile)


@pytest.mark.parametrize("name", ["newline", "cr", "esc", "line-separator"])
def test_onnx_metadata_cannot_forge_the_report(cli, example_dirs, tmp_path, name):
    """Metadata with '\\nPASSED' printed a fake PASSED line inside a failing report."""
    import onnx

    from adafuse_export.converters import load_checkpoint
    from adafuse_export.onnx.export import export_onnx

    hostile = HOSTILE[name].replace(FORGED, "PASSED")
    export_onnx(load_checkpoint(example_dirs["pregate"]), tmp_path / "onnx")
    m = onnx.load(str(tmp_path / "onnx" / "decoder.onnx"), load_external_data=False)
    for p in m.metadata_props:
        if p.key in ("adafuse.flavour", "adafuse.dtype"):
            p.value = hostile
    onnx.save(m, str(tmp_path / "onnx" / "decoder.onnx"))
    ckpt = edited(example_dirs["pregate"], tmp_path / "ckpt",
                  lambda t: t["lm_head.weight"].__setitem__(5, t["lm_head.weight"][5] + np.float32(0.5)))
    r = cli("validate", ckpt, tmp_path / "onnx", "--steps", "1")
    assert r.code == 1 and r.out.splitlines()[-1] == "FAILED", r.out
    assert_escaped(r.out, hostile)


def test_convert_cannot_forge_a_wrote_line(cli, example_dirs, tmp_path):
    """A folder name holding a newline printed a forged 'wrote ... verified' line."""
    hostile = HOSTILE["newline"]
    ckpt = tmp_path / f"ckpt-{hostile}"
    shutil.copytree(example_dirs["pregate"], ckpt)
    r = cli("convert", ckpt, tmp_path / "m.engine", "--validate", "off")
    assert_escaped(r.out + r.err, hostile)


# --- 6. tracebacks: every failure of an input is one line ---------------------------------------

def run_cli(*args, env=None, timeout=120):
    import os

    r = subprocess.run([sys.executable, "-m", "adafuse_export", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})))
    return r


def long_place(where: str, n: int):
    """A path component of n characters placed where an input or output names a path."""
    def make(ckpt: Path, tmp: Path) -> tuple[list, str]:
        name = "n" * n
        if where == "ckpt-argument":
            return ["inspect", tmp / name], name
        if where == "output-argument":
            return ["export-onnx", ckpt, tmp / name / "onnx"], name
        if where == "save-logits":
            return ["run", ckpt, "--prompt-ids", "1", "--save-logits", tmp / f"{name}.safetensors"], name
        if where == "engine-output":
            return ["convert", ckpt, tmp / f"{name}.engine"], name
        if where == "base_model_name_or_path":
            d = peft_dir(tmp, ckpt)
            cfg = json.loads((d / "adapter_config.json").read_text())
            (d / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(tmp / name)}))
            return ["inspect", d], name
        if where == "shard-name":
            weights = load_file(ckpt / "model.safetensors")
            (ckpt / "model.safetensors").unlink()
            (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: name + ".safetensors"
                                                                                          for k in weights}}))
            return ["inspect", ckpt], name
        raise AssertionError(where)
    return make


LONG = [(w, n) for w in ("ckpt-argument", "output-argument", "save-logits", "engine-output", "base_model_name_or_path",
                         "shard-name") for n in (256, 300, 4000)]


@pytest.mark.parametrize("where,n", LONG, ids=[f"{w}-{n}" for w, n in LONG])
def test_name_too_long(cli, example_dirs, tmp_path, where, n):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(example_dirs["pregate"], ckpt)
    args, name = long_place(where, n)(ckpt, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    line = one_line(cli(*args), name)
    assert "too long" in line or "not found" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary left


@pytest.mark.parametrize("element", [["sliding_attention"], {"kind": "full_attention"}, 1, None, True])
@pytest.mark.parametrize("family", ["gemma2", "qwen2", "qwen3"])
def test_layer_types_elements(cli, tmp_path, family, element):
    from adafuse_export.examples import make_example

    d = tmp_path / family
    make_example(d, "pregate", family)
    cfg = json.loads((d / "config.json").read_text())
    cfg["layer_types"] = ["full_attention", element]
    if family != "gemma2":
        cfg.update(sliding_window=16, use_sliding_window=True)
    (d / "config.json").write_text(json.dumps(cfg))
    one_line(cli("inspect", d), "layer_types must list 2 of 'full_attention' / 'sliding_attention'")


def manifest_cases():
    from adafuse_export.trt.manifest import FIELD_TYPES

    return [(s, k, bad) for s, fields in FIELD_TYPES.items() for k in fields for bad in (["x"], {"a": 1}, 1.5)]


@pytest.mark.parametrize("section,key,bad", manifest_cases())
def test_engine_manifest_field_types(tmp_path, section, key, bad):
    from adafuse_export.errors import AdafuseError
    from adafuse_export.trt.manifest import MANIFEST_FORMAT, MANIFEST_VERSION, sha256_file, verify_engine

    engine = tmp_path / "m.engine"
    engine.write_bytes(b"engine")
    manifest: dict = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "engine": {"sha256": sha256_file(engine)},
                      "files": {}}
    manifest.setdefault(section, {})[key] = bad
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    with pytest.raises(AdafuseError, match=re.escape(f"'{section}.{key}' must be ")):
        verify_engine(engine)


def test_engine_manifest_backend_list_through_validate(cli, example_dirs, tmp_path):
    from adafuse_export.trt.manifest import MANIFEST_FORMAT, MANIFEST_VERSION, sha256_file

    engine = tmp_path / "m.engine"
    engine.write_bytes(b"engine")
    (tmp_path / "m.json").write_text(json.dumps({"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "files": {},
                                                 "engine": {"sha256": sha256_file(engine), "backend": ["tensorrt"]}}))
    one_line(cli("validate", example_dirs["pregate"], engine), "'engine.backend' must be str, found list [\"tensorrt\"]")


@pytest.mark.parametrize("order", [[1, "q_proj"], ["q_proj", None], [["q_proj"], "k_proj"]])
def test_xlora_module_order_types(cli, xlora_dir, tmp_path, order):
    d = tmp_path / "c"
    shutil.copytree(xlora_dir[1], d)
    cfg = json.loads((d / "adafuse_config.json").read_text())
    cfg["xlora"]["module_order"] = order
    (d / "adafuse_config.json").write_text(json.dumps(cfg))
    one_line(cli("inspect", d), f"X-LoRA module_order must be a list of module names, found {order!r}")


@pytest.mark.parametrize("key,value", [("offset", "abc"), ("offset", "-1"), ("length", "1e3"), ("offset", ""),
                                       ("length", "\u0661")])
def test_external_data_numbers(cli, example_dirs, tmp_path, key, value):
    import onnx

    from adafuse_export.converters import load_checkpoint
    from adafuse_export.onnx.export import export_onnx

    export_onnx(load_checkpoint(example_dirs["pregate"]), tmp_path / "onnx", external_data_threshold=0)
    m = onnx.load(str(tmp_path / "onnx" / "decoder.onnx"), load_external_data=False)
    t = next(t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    entry = next((e for e in t.external_data if e.key == key), None) or t.external_data.add()
    entry.key, entry.value = key, value
    onnx.save(m, str(tmp_path / "onnx" / "decoder.onnx"))
    one_line(cli("validate", example_dirs["pregate"], tmp_path / "onnx"),
             f"external data {key} of tensor '{t.name}' must be a byte count, found {value!r}")


def routes_edits():
    def drop(key):
        return lambda t: t.pop(key), f"missing tensor '{key}'"

    def set_id(v):
        def edit(t):
            t["expert_ids"][3, 0] = v
        return edit, f"'expert_ids': expert id {v} is out of range [0, 4)"

    def nan_gate(t):
        t["gates"][2, 1] = np.nan

    def gate_outside(t):
        t["gates"][2, 1], t["gates"][5, 0] = 1.5, -0.25

    def short(t):
        t["gates"] = t["gates"][:10]

    return {"no-gates": drop("gates"), "no-ids": drop("expert_ids"), "id-4": set_id(4), "id-minus-1": set_id(-1),
            "id-int32-max": set_id(2 ** 31 - 1), "nan-gate": (nan_gate, "'gates' holds NaN/Inf values"),
            "gates-outside-0-1": (gate_outside, "'gates' holds 2 of 512 weights outside [0, 1]; a routing table holds "
                                  "the pre-gate's softmax weights"),
            "short-gates": (short, "expected 'expert_ids' and 'gates' of shape [256, top_k], found [256, 2] and [10, 2]")}


@pytest.mark.parametrize("case", sorted(routes_edits()))
def test_routes_file(cli, example_dirs, tmp_path, case):
    from adafuse_export.converters import load_checkpoint
    from adafuse_export.onnx.export import export_onnx

    edit, fragment = routes_edits()[case]
    export_onnx(load_checkpoint(example_dirs["pregate"]), tmp_path / "onnx")
    (tmp_path / "onnx" / "pregate.onnx").unlink()  # the runner gathers from the table
    t = load_file(tmp_path / "onnx" / "routes.safetensors")
    edit(t)
    save_file(t, tmp_path / "onnx" / "routes.safetensors")
    one_line(cli("validate", example_dirs["pregate"], tmp_path / "onnx", "--steps", "1"),
             f"{tmp_path / 'onnx' / 'routes.safetensors'}: ", fragment)


@pytest.mark.parametrize("library", ["libm.so.6", "libz.so.1", "libc.so.6"])
def test_runtime_lib_unrelated(example_dirs, tmp_path, library):
    from adafuse_export.errors import AdafuseError
    from adafuse_export.runners.cpp_runtime import load_library

    import ctypes.util

    if ctypes.util.find_library(library.split(".so")[0][3:]) is None:
        pytest.skip(f"{library} is not installed here")
    with pytest.raises(AdafuseError, match=re.escape(f"{library}: not the adafuse C++ runtime (it has no 'adafuse_")):
        load_library(library)
    (tmp_path / "m.engine").write_bytes(b"engine")
    (tmp_path / "m.json").write_text("{}")
    r = run_cli("validate", example_dirs["pregate"], tmp_path / "m.engine", "--runtime", "cpp",
                env={"ADAFUSE_RUNTIME_LIB": library})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"error: {library}: not the adafuse C++ runtime" in r.stderr, r.stderr


def test_validate_stderr_is_one_line_when_the_model_overflows(example_dirs, tmp_path):
    """numpy's RuntimeWarning (inf - inf) reached stderr beside the report."""
    ckpt, model = overflow_example(example_dirs["pregate"], tmp_path, 3e4, "float16")
    r = run_cli("validate", ckpt, model, "--steps", "1", timeout=300)
    assert r.returncode == 1 and r.stderr.strip() == "error: validation failed: 1 output(s) out of tolerance (logits)", r.stderr


@pytest.mark.parametrize("n", [256, 1000])
def test_xlora_adapter_path_too_long(cli, xlora_dir, tmp_path, n):
    d = tmp_path / "x"
    shutil.copytree(xlora_dir[0], d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["adapters"]["1"] = str(tmp_path / ("n" * n))
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    one_line(cli("inspect", d), "n" * n, "too long")


# --- 7. outputs that hurt -------------------------------------------------------------------------

CWD_CASES = [("export-onnx", "."), ("export-onnx", "./"), ("export-onnx", ".."), ("make-example", "."),
             ("make-example", "..")]


@pytest.mark.parametrize("command,out", CWD_CASES)
def test_output_is_or_contains_the_current_directory(cli, example_dirs, tmp_path, monkeypatch, command, out):
    """`export-onnx CKPT .` from inside the output folder gave a traceback and left '..xxxx.tmp.old' behind."""
    here = tmp_path / "parent" / "here"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    args = ["export-onnx", example_dirs["pregate"], out] if command == "export-onnx" else ["make-example", out]
    one_line(cli(*args, "--force"), f"OUT_DIR {Path(out)}: the output {'is' if Path(out) == Path('.') else 'contains'} "
             "the current directory")
    assert [p.name for p in (tmp_path / "parent").iterdir()] == ["here"] and not any(here.iterdir())


def convert_outputs_of_ours(tmp: Path) -> Path:
    """An earlier convert's outputs (the manifest names the engine), as --force may replace them."""
    from adafuse_export.trt.manifest import MANIFEST_FORMAT, MANIFEST_VERSION

    (tmp / "m.engine").write_bytes(b"engine")
    (tmp / "m.json").write_text(json.dumps({"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
                                            "engine": {"file": "m.engine"}}))
    return tmp / "m.onnx"


@pytest.mark.parametrize("foreign", ["notes.txt", ".hidden", "sub/", "decoder.onnx.bak"])
@pytest.mark.parametrize("command", ["export-onnx", "make-example", "convert"])
def test_force_keeps_the_users_files(cli, example_dirs, tmp_path, command, foreign):
    """--force deleted a user's notes.txt inside an earlier export or example folder."""
    from adafuse_export.converters import load_checkpoint
    from adafuse_export.onnx.export import export_onnx

    if command == "make-example":
        out = tmp_path / "ex"
        assert cli("make-example", out).code == 0
        args = ["make-example", out, "--force"]
    else:
        out = tmp_path / "onnx" if command == "export-onnx" else convert_outputs_of_ours(tmp_path)
        export_onnx(load_checkpoint(example_dirs["pregate"]), out)
        args = (["export-onnx", example_dirs["pregate"], out, "--force"] if command == "export-onnx"
                else ["convert", example_dirs["pregate"], tmp_path / "m.engine", "--force"])
    if foreign.endswith("/"):
        (out / foreign).mkdir()
    else:
        (out / foreign).write_text("the user's own\n")
    line = one_line(cli(*args), f"holds {foreign.rstrip('/')!r}, which adafuse-export did not write")
    assert (out / foreign).exists(), line
    (out / foreign).rmdir() if foreign.endswith("/") else (out / foreign).unlink()
    if command != "convert":  # without the user's file, --force replaces what the tool wrote
        assert cli(*args).code == 0


def stall_script(command: str, world: Path, ready: Path) -> str:
    """A CLI run that stops, once its temporary output exists, inside the export (export-onnx) or validation (convert)."""
    target = ("import adafuse_export.onnx.export as m\nm._check = stall\n" if command == "export-onnx"
              else "import adafuse_export.convert as m\nm.validate_stage = stall\n")
    out = world / "out" / ("onnx" if command == "export-onnx" else "m.engine")
    return (f"import sys, time, pathlib\n"
            f"def stall(*a, **k):\n    pathlib.Path({str(ready)!r}).touch()\n    time.sleep(120)\n"
            f"{target}"
            f"from adafuse_export.cli import entry_point\n"
            f"sys.argv = ['adafuse-export', {command!r}, {str(world / 'ckpt')!r}, {str(out)!r}]\n"
            f"entry_point()\n")


@pytest.mark.parametrize("signame,expected", [("SIGHUP", "hangup"), ("SIGTERM", "terminated")])
@pytest.mark.parametrize("command", ["export-onnx", "convert"])
def test_hangup_leaves_no_temporary(example_dirs, tmp_path, command, signame, expected):
    import os
    import signal
    import time

    shutil.copytree(example_dirs["pregate"], tmp_path / "ckpt")
    (tmp_path / "out").mkdir()
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", stall_script(command, tmp_path, ready)], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    t0 = time.time()
    while not ready.exists():
        assert proc.poll() is None and time.time() - t0 < 180, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.1)
    assert any((tmp_path / "out").iterdir())  # the temporary output exists while it works
    proc.send_signal(getattr(signal, signame))
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + getattr(signal, signame) and err.strip().splitlines()[-1] == f"error: {expected}", err
    assert list((tmp_path / "out").iterdir()) == []


def marker_fifo(marker: Path):
    import os

    os.mkfifo(marker)


def marker_dev_zero(marker: Path):
    marker.symlink_to("/dev/zero")


def marker_huge(marker: Path):
    with open(marker, "wb") as f:
        f.truncate(1 << 33)  # 8 GiB, sparse


def marker_directory(marker: Path):
    marker.mkdir()


def marker_link_to_real(marker: Path):
    real = marker.parent.parent / "real-marker.json"
    real.write_text(json.dumps({"host": "h", "pid": 1, "output": "m.engine"}))
    marker.symlink_to(real)


@pytest.mark.parametrize("plant", [marker_fifo, marker_dev_zero, marker_huge, marker_directory, marker_link_to_real],
                         ids=lambda f: f.__name__)
def test_staging_marker_is_read_like_an_input(tmp_path, plant):
    """A FIFO or a /dev/zero symlink as a stale staging folder's owner marker hung convert or raised MemoryError."""
    import os

    from adafuse_export.staging import MARKER

    staging = tmp_path / ".m.engine.abcd1234.tmp"
    staging.mkdir()
    plant(staging / MARKER)
    code = ("from pathlib import Path\nfrom adafuse_export.staging import remove_stale_stagings\n"
            f"print(remove_stale_stagings(Path({str(tmp_path / 'm.engine')!r})))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr
    assert f"note: left {staging} alone: it carries no adafuse owner marker of this host" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == "[]" and staging.exists()


def test_convert_file_size_limit_is_one_line(example_dirs, tmp_path):
    """The engine write was outside the write-error handling: ulimit -f gave an OSError traceback."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # the ONNX export fits, the engine does not

    shutil.copytree(example_dirs["pregate"], tmp_path / "ckpt")
    (tmp_path / "out").mkdir()
    import os

    r = subprocess.run([sys.executable, "-m", "adafuse_export", "convert", tmp_path / "ckpt", tmp_path / "out" / "m.engine",
                        "--validate", "off"], capture_output=True, text=True, timeout=600, preexec_fn=limit,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'out' / 'm.engine'}: cannot write: File too large"], r.stderr
    assert list((tmp_path / "out").iterdir()) == []
