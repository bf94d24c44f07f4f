"""Issue 10's classes of bad input and output, generated at test time, across every command they reach.

Each case: exit 2, one line naming the input, no traceback, nothing written, no input file changed
(the checkpoint is hashed before and after). Hang cases run in a subprocess with a time bound.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adafuse_export.checkpoint import ADAPTER_CONFIG, ADAPTERS
from adafuse_export.converters.peft_lora import ADAPTER_CONFIG as PEFT_CONFIG
from adafuse_export.examples import make_example
from adafuse_export.inputs import MAX_JSON_DEPTH, read_json
from adafuse_export.trt.manifest import verify_engine

REPO = Path(__file__).resolve().parent.parent


def digest(root: Path) -> dict:
    """Every file under root (not following links) with its SHA-256: the 'nothing changed' witness."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[str(p.relative_to(root))] = "dir"
    return out


def one_line(r, *fragments) -> str:
    assert r.code == 2, (r.code, r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    assert "Traceback" not in r.err
    for f in fragments:
        assert str(f) in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture
def world(example_dirs, tmp_path):
    """tmp/ckpt (a pregate example), tmp/out (empty), tmp/user.txt (a user's own file)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(example_dirs["pregate"], ckpt)
    (tmp_path / "out").mkdir()
    (tmp_path / "user.txt").write_text("the user's own notes\n")
    return tmp_path


def expect_refused(cli, world: Path, args: list, *fragments):
    before = digest(world)
    line = one_line(cli(*args), *fragments)
    assert digest(world) == before, "an input changed or an output appeared"
    return line


# --- 1. no clobbering: (command args, fragments) -------------------------------------------------

def clobber_cases(w: Path) -> list[tuple[str, list, tuple]]:
    c = w / "ckpt"
    return [
        ("run-save-logits-onto-weights", ["run", c, "--prompt-ids", "1", "--save-logits", c / "model.safetensors"],
         ("--save-logits", "sits inside the input")),
        ("run-save-logits-onto-checkpoint", ["run", c, "--prompt-ids", "1", "--save-logits", c], ("is the input",)),
        ("run-save-logits-onto-user-file", ["run", c, "--prompt-ids", "1", "--save-logits", w / "user.txt"],
         ("user.txt", "already exists")),
        ("run-save-logits-force-over-user-file", ["run", c, "--prompt-ids", "1", "--save-logits", w / "user.txt", "--force"],
         ("not written by adafuse-export",)),
        ("export-onnx-onto-checkpoint", ["export-onnx", c, c, "--force"], ("OUT_DIR", "is the input")),
        ("export-onnx-inside-checkpoint", ["export-onnx", c, c / "onnx"], ("sits inside the input",)),
        ("export-onnx-containing-checkpoint", ["export-onnx", c, w, "--force"], ("contains the input",)),
        ("export-onnx-force-over-user-dir", ["export-onnx", c, w / "userdir", "--force"],
         ("not written by adafuse-export",)),
        ("convert-into-checkpoint", ["convert", c, c / "config.engine", "--force"], ("ENGINE", "sits inside the input")),
        ("convert-timing-cache-onto-weights", ["convert", c, w / "out" / "m.engine", "--timing-cache", c / "model.safetensors"],
         ("--timing-cache", "sits inside the input")),
        ("convert-timing-cache-directory", ["convert", c, w / "out" / "m.engine", "--timing-cache", w / "userdir"],
         ("--timing-cache", "expected a file, found a directory")),
        ("convert-force-over-user-engine", ["convert", c, w / "user.engine", "--force"], ("not written by adafuse-export",)),
        ("export-routes-onto-weights", ["export-routes", c, c / "model.safetensors", "--force"], ("sits inside the input",)),
        ("export-routes-through-symlink", ["export-routes", c, w / "link.safetensors", "--force"], ("sits inside the input",)),
        ("export-routes-force-over-user-file", ["export-routes", c, w / "user.txt", "--force"],
         ("not written by adafuse-export",)),
        ("make-example-force-over-user-dir", ["make-example", w / "userdir", "--force"], ("not written by adafuse-export",)),
        ("make-example-force-over-checkpoint", ["make-example", c, "--force"], ("not written by adafuse-export",)),
    ]


CLOBBER_IDS = [name for name, _, _ in clobber_cases(Path("/w"))]


@pytest.mark.parametrize("case", CLOBBER_IDS)
def test_outputs_never_destroy_inputs(cli, world, case):
    (world / "userdir").mkdir()
    (world / "userdir" / "thesis.tex").write_text("years of work\n")
    (world / "user.engine").write_bytes(b"not ours")
    os.symlink(world / "ckpt" / "model.safetensors", world / "link.safetensors")
    _, args, fragments = next(c for c in clobber_cases(world) if c[0] == case)
    expect_refused(cli, world, args, *fragments)


def test_force_replaces_what_the_tool_wrote(cli, world):
    c, out = world / "ckpt", world / "out"
    assert cli("export-routes", c, out / "r.safetensors").code == 0
    assert cli("export-routes", c, out / "r.safetensors", "--force").code == 0
    assert cli("make-example", out / "ex").code == 0
    assert cli("make-example", out / "ex", "--force", "--kind", "lora").code == 0
    assert cli("run", c, "--prompt-ids", "1", "--save-logits", out / "l.safetensors").code == 0
    one_line(cli("run", c, "--prompt-ids", "1", "--save-logits", out / "l.safetensors"), "already exists")
    assert cli("run", c, "--prompt-ids", "1", "--save-logits", out / "l.safetensors", "--force").code == 0


def test_outputs_have_umask_permissions(cli, world):
    """routes.safetensors inside an export used to be 0600."""
    assert cli("export-onnx", world / "ckpt", world / "out" / "onnx").code == 0
    mask = os.umask(0o22)
    os.umask(mask)
    for p in (world / "out" / "onnx").iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p


# --- 2. confinement -------------------------------------------------------------------------------

def shard(ckpt: Path, name: str):
    t = load_file(ckpt / "model.safetensors")
    save_file(t, ckpt.parent / "elsewhere.safetensors")
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: name for n in t}}))


def index_dotdot(ckpt):
    shard(ckpt, "../elsewhere.safetensors")
    return "model.safetensors.index.json", "outside"


def index_absolute(ckpt):
    shard(ckpt, str(ckpt.parent / "elsewhere.safetensors"))
    return "model.safetensors.index.json", "outside"


def symlink_out(ckpt):
    shutil.move(ckpt / "model.safetensors", ckpt.parent / "elsewhere.safetensors")
    os.symlink(ckpt.parent / "elsewhere.safetensors", ckpt / "model.safetensors")
    return "model.safetensors", "symbolic link to"


def config_symlink_to_system_file(ckpt):
    (ckpt / "config.json").unlink()
    os.symlink("/etc/hostname", ckpt / "config.json")
    return "config.json", "outside"


CONFINE = [index_dotdot, index_absolute, symlink_out, config_symlink_to_system_file]
READERS = {
    "inspect": lambda c, o: ["inspect", c],
    "run": lambda c, o: ["run", c, "--prompt-ids", "1", "--save-logits", o / "l.safetensors"],
    "export-onnx": lambda c, o: ["export-onnx", c, o / "onnx"],
    "export-routes": lambda c, o: ["export-routes", c, o / "r.safetensors"],
    "convert": lambda c, o: ["convert", c, o / "m.engine"],
    "validate": lambda c, o: ["validate", c, o],
}


@pytest.mark.parametrize("command", sorted(READERS))
@pytest.mark.parametrize("breaker", CONFINE, ids=lambda f: f.__name__)
def test_paths_named_by_inputs_stay_inside(cli, world, breaker, command):
    culprit, fragment = breaker(world / "ckpt")
    expect_refused(cli, world, READERS[command](world / "ckpt", world / "out"), culprit, fragment)


def test_symlinks_inside_and_hf_cache_layout_are_followed(cli, example_dirs, tmp_path):
    """The documented rule: a link to a file inside the checkpoint, or inside the same HF cache repo folder."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in Path(example_dirs["pregate"]).iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.name.encode()).hexdigest()
        shutil.copy(f, blob)
        os.symlink(Path("..") / ".." / "blobs" / blob.name, snap / f.name)
    assert cli("inspect", snap).code == 0
    inside = tmp_path / "inside"
    shutil.copytree(example_dirs["pregate"], inside)
    (inside / "weights").mkdir()
    shutil.move(inside / "model.safetensors", inside / "weights" / "m.safetensors")
    os.symlink("weights/m.safetensors", inside / "model.safetensors")
    assert cli("inspect", inside).code == 0


def test_engine_manifest_files_are_confined_and_typed(tmp_path):
    from adafuse_export.errors import AdafuseError
    from adafuse_export.trt.manifest import MANIFEST_FORMAT, MANIFEST_VERSION, sha256_file

    engine = tmp_path / "m.engine"
    engine.write_bytes(b"engine")
    base = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "engine": {"sha256": sha256_file(engine)}}
    for files, fragment in (({"../../etc/hostname": "x"}, "outside"), ({"/etc/hostname": "x"}, "outside"),
                            (["a"], "'files' must map"), ({"a": 3}, "'files' must map")):
        (tmp_path / "m.json").write_text(json.dumps({**base, "files": files}))
        with pytest.raises(AdafuseError, match=fragment):
            verify_engine(engine)
    (tmp_path / "m.json").write_text(json.dumps({**base, "engine": "x"}))
    with pytest.raises(AdafuseError, match="'engine' must be an object"):
        verify_engine(engine)


# --- 3. hangs (subprocess, time bound) -----------------------------------------------------------

def run_cli(args, timeout=60, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "adafuse_export", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=env, **kw)
    return r, time.time() - t0


def fifo_config(ckpt):
    (ckpt / "config.json").unlink()
    os.mkfifo(ckpt / "config.json")
    return "config.json", "FIFO"


def fifo_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    os.mkfifo(ckpt / "model.safetensors")
    return "model.safetensors", "FIFO"


def fifo_adapter_config(ckpt):
    (ckpt / ADAPTER_CONFIG).unlink()
    os.mkfifo(ckpt / ADAPTER_CONFIG)
    return ADAPTER_CONFIG, "FIFO"


@pytest.mark.parametrize("command", ["inspect", "run", "export-onnx"])
@pytest.mark.parametrize("breaker", [fifo_config, fifo_weights, fifo_adapter_config], ids=lambda f: f.__name__)
def test_fifo_never_blocks(world, breaker, command):
    culprit, fragment = breaker(world / "ckpt")
    r, seconds = run_cli(READERS[command](world / "ckpt", world / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert culprit in r.stderr and fragment in r.stderr
    assert seconds < 30
    assert list((world / "out").iterdir()) == []


def peft_dir(tmp_path: Path, example: Path, extra: dict | None = None, **cfg) -> Path:
    """A PEFT LoRA adapter (q_proj, v_proj) on the example's base; `extra` adds tensors (name -> shape) of ones."""
    base_cfg = json.loads((example / "config.json").read_text())
    h, layers = base_cfg["hidden_size"], base_cfg["num_hidden_layers"]
    kv = base_cfg.get("num_key_value_heads", base_cfg["num_attention_heads"]) * (h // base_cfg["num_attention_heads"])
    d = tmp_path / "peft"
    d.mkdir()
    tensors = {}
    for layer in range(layers):
        for m, out in (("q_proj", h), ("v_proj", kv)):
            p = f"base_model.model.model.layers.{layer}.self_attn.{m}"
            tensors[f"{p}.lora_A.weight"] = torch.randn(4, h) * 0.01
            tensors[f"{p}.lora_B.weight"] = torch.randn(out, 4) * 0.01
    for name, shape in (extra or {}).items():
        tensors[name] = torch.ones(shape)
    save_file(tensors, d / "adapter_model.safetensors")
    (d / PEFT_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "bias": "none",
                                                "target_modules": ["q_proj", "v_proj"],
                                                "base_model_name_or_path": str(example), **cfg}))
    return d


def test_pathological_rank_pattern_is_bounded(example_dirs, tmp_path):
    d = peft_dir(tmp_path, example_dirs["pregate"], rank_pattern={"(([a-z._0-9]|[a-z])+)+[^a-z_.0-9]": 2})
    r, seconds = run_cli(["inspect", d])
    assert r.returncode == 2 and "rank_pattern" in r.stderr and "backtracking" in r.stderr, r.stderr
    assert seconds < 30


def test_peft_patterns_match_like_peft(example_dirs, tmp_path, cli):
    """The bounded matcher keeps PEFT's own rule (peft.utils.other.get_pattern_key: the first matching key)."""
    from peft.utils.other import get_pattern_key

    pattern = {r"layers\.1\..*": 3, "q_proj": 5}
    d = peft_dir(tmp_path, example_dirs["pregate"], alpha_pattern=pattern)
    info = json.loads(cli("inspect", d, "--json").out)
    expected = {}
    for layer in range(2):
        for m in ("q_proj", "v_proj"):
            key = get_pattern_key(list(pattern), f"model.layers.{layer}.self_attn.{m}")
            if key in pattern:
                expected[f"layers.{layer}.{m}"] = float(pattern[key])
    assert info["adapter"]["alpha_pattern"] == expected and expected


# --- 4. unbounded work / 5. silent wrong answers / 6. tracebacks: checkpoint edits ---------------

def edit_json(name, change, fragment, culprit=None):
    def make(ckpt: Path):
        cfg = json.loads((ckpt / name).read_text())
        change(cfg)
        (ckpt / name).write_text(json.dumps(cfg))
        return culprit or name, fragment
    return make


def named(fn, name):
    fn.__name__ = name
    return fn


def huge_shard_count(ckpt):
    t = load_file(ckpt / "model.safetensors")
    save_file(t, ckpt / "model-00001-of-999999999999.safetensors")
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "model-00001-of-999999999999.safetensors" for n in t}}))
    return "model.safetensors.index.json", "not contiguous"


def deep_json(ckpt):
    (ckpt / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    return "config.json", "nested deeper"


def long_integer(ckpt):
    text = (ckpt / "config.json").read_text().replace('"vocab_size": 256', '"vocab_size": ' + "9" * 5000)
    (ckpt / "config.json").write_text(text)
    return "config.json", "vocab_size" if "9" * 5000 not in text else "invalid JSON"


def nan_weight(ckpt):
    t = load_file(ckpt / "model.safetensors")
    t["model.embed_tokens.weight"][3, 1] = float("nan")
    save_file(t, ckpt / "model.safetensors")
    return "model.safetensors", "'model.embed_tokens.weight' has 1 NaN/Inf"


def overlapping_offsets(ckpt):
    t = load_file(ckpt / ADAPTERS)
    raw = (ckpt / ADAPTERS).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    names = [k for k in header if k != "__metadata__"]
    a, b = sorted(names, key=lambda k: header[k]["data_offsets"][0])[:2]
    size = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    begin = header[a]["data_offsets"][0]
    if header[a]["data_offsets"][1] - begin >= size:
        header[b]["data_offsets"] = [begin, begin + size]
    text = json.dumps(header).encode()
    (ckpt / ADAPTERS).write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    assert t  # the original file was a valid safetensors file
    return ADAPTERS, "overlap"


def unhashable_dtype(ckpt):
    text = b'{"pregate.weight": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}'
    (ckpt / ADAPTERS).write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 4)
    return ADAPTERS, "dtype ['F32'] is not supported"


EDITS = [
    edit_json("config.json", lambda c: c.update(num_hidden_layers=10 ** 8), "num_hidden_layers is 100000000"),
    named(huge_shard_count, "huge_shard_count"), named(deep_json, "deep_json"), named(long_integer, "long_integer"),
    edit_json("config.json", lambda c: c.update(head_dim=-8), "key 'head_dim' must be positive, found -8"),
    edit_json("config.json", lambda c: c.update(max_position_embeddings=0), "max_position_embeddings"),
    edit_json(ADAPTER_CONFIG, lambda c: c.update(use_rslora="no"), "key 'use_rslora' must be bool"),
    edit_json(ADAPTER_CONFIG, lambda c: c.update(top_k=1.5), "key 'top_k' must be int"),
    edit_json(ADAPTER_CONFIG, lambda c: c.update(rank_pattern={"q_proj": 2.5}), "rank_pattern['q_proj'] must be a number"),
    edit_json(ADAPTER_CONFIG, lambda c: c.update(num_experts=10 ** 12), "num_experts must be an integer of at most"),
    edit_json(ADAPTER_CONFIG, lambda c: c.update(num_experts=10 ** 30), "'num_experts' must be a finite number of at most"),
    named(nan_weight, "nan_weight"), named(overlapping_offsets, "overlapping_offsets"),
    named(unhashable_dtype, "unhashable_dtype"),
]
for i, e in enumerate(EDITS):
    if e.__name__ == "make":
        e.__name__ = f"edit{i}"

# NaN in a weight is found where weights are read (run/export/convert), not by the header-only inspect;
# validate here stops earlier, at its empty MODEL directory.
CASES = [(b, c) for b in EDITS for c in sorted(READERS) if not (b.__name__ == "nan_weight" and c == "validate")]


@pytest.mark.parametrize("breaker,command", CASES, ids=[f"{b.__name__}-{c}" for b, c in CASES])
def test_bad_checkpoints(cli, world, breaker, command):
    culprit, fragment = breaker(world / "ckpt")
    if breaker.__name__ == "nan_weight" and command == "inspect":
        assert cli(*READERS[command](world / "ckpt", world / "out")).code == 0  # inspect reads headers only
        return
    t0 = time.time()
    expect_refused(cli, world, READERS[command](world / "ckpt", world / "out"), culprit, fragment)
    assert time.time() - t0 < 30


def test_sliding_window_must_be_positive(cli, tmp_path):
    for window in (0, -4):
        d = tmp_path / f"mistral{window}"
        make_example(d, "pregate", "mistral")
        cfg = json.loads((d / "config.json").read_text())
        cfg["sliding_window"] = window
        (d / "config.json").write_text(json.dumps(cfg))
        one_line(cli("run", d, "--prompt-ids", "1,2"), "config.json", "'sliding_window' must be positive")


def test_context_bounded_by_max_position_embeddings(cli, world):
    c = world / "ckpt"
    limit = json.loads((c / "config.json").read_text()).get("max_position_embeddings", 4096)
    expect_refused(cli, world, ["run", c, "--prompt-ids", "1", "--max-new-tokens", str(limit)],
                   "--max-new-tokens", f"context of {limit} positions")
    expect_refused(cli, world, ["run", c, "--prompt-ids", ",".join(["1"] * 60_000)], "60000 tokens")
    expect_refused(cli, world, ["validate", c, world / "out", "--prompt-ids", ",".join(["1"] * limit)], "--steps")


def test_moe_peft_config_checked_against_tensors(cli, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fixtures_real as fr

    base = fr.write_hf_base(tmp_path / "base", "llama")
    for change, fragment in ((lambda c: c.update(top_k=1.5), "'top_k' must be a positive integer, found 1.5"),
                             (lambda c: c.update(r=c["r"] + 1), "have rank"),
                             (lambda c: c.update(use_rslora="no"), "'use_rslora' must be true or false")):
        d = fr.write_moe_peft_synthetic(tmp_path / f"m{len(list(tmp_path.iterdir()))}", base, "mola")
        cfg = json.loads((d / PEFT_CONFIG).read_text())
        change(cfg)
        (d / PEFT_CONFIG).write_text(json.dumps(cfg))
        one_line(cli("inspect", d), PEFT_CONFIG if fragment != "have rank" else "", fragment)


@pytest.mark.parametrize("payload,fragment", [
    (lambda: {1: torch.zeros(2)}, "tensor names must be strings"),
    (lambda: {"a": torch.zeros(2, 2).to_sparse()}, "expected a dense CPU tensor"),
    (lambda: {"a": torch.zeros(2, device="meta")}, "expected a dense CPU tensor"),
    (lambda: {"a": torch.zeros(2, dtype=torch.complex64)}, "dtype torch.complex64"),
    (lambda: {"a": torch.tensor([float("inf")])}, "NaN/Inf"),
    (lambda: [torch.zeros(2)], "expected a dict of tensors"),
    (lambda: {"a": torch.nn.Linear(2, 2)}, "weights_only"),  # refused pickle: torch's advice must not show
])
def test_pickled_adapters(cli, example_dirs, tmp_path, payload, fragment):
    d = peft_dir(tmp_path, example_dirs["pregate"])
    (d / "adapter_model.safetensors").unlink()
    torch.save(payload(), d / "adapter_model.bin")
    r = cli("inspect", d)
    if fragment == "weights_only":
        line = one_line(r, "adapter_model.bin", "nothing that would run code")
        assert "weights_only" not in line
    else:
        one_line(r, "adapter_model.bin", fragment)


# --- 6. misleading messages and process-level failures ------------------------------------------

@pytest.mark.parametrize("model,fragment", [
    ("m.json", "name the .engine file, not its .json manifest"),
    ("m.textproto", "found a file named '*.textproto'"),
    ("missing.engine", "missing.engine: engine file not found"),
])
def test_validate_model_kinds(cli, world, model, fragment):
    (world / "out" / "m.json").write_text("{}")
    (world / "out" / "m.textproto").write_text("ir_version: 8")
    expect_refused(cli, world, ["validate", world / "ckpt", world / "out" / model], fragment)


def test_nan_tolerance(cli, world):
    expect_refused(cli, world, ["validate", world / "ckpt", world / "out", "--atol", "nan"], "--atol", "finite")


def test_non_utf8_paths(cli, world):
    bad = os.fsdecode(bytes(world) + b"/ckpt\xff")
    shutil.copytree(world / "ckpt", bad)
    one_line(cli("inspect", bad), "not valid UTF-8")
    one_line(cli("run", world / "ckpt", "--prompt-ids", "1", "--save-logits", os.fsdecode(bytes(world) + b"/l\xff")),
             "--save-logits", "not valid UTF-8")


def test_file_size_limit_leaves_nothing(world):
    """RLIMIT_FSIZE (and a full disk alike): EFBIG, one line naming the output, no temporary left."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    out = world / "out"
    r, _ = run_cli(["export-onnx", world / "ckpt", out / "onnx"], preexec_fn=limit)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert str(out / "onnx") in r.stderr and ".tmp" not in r.stderr
    assert list(out.iterdir()) == []


def test_json_reader_bounds(tmp_path):
    from adafuse_export.errors import AdafuseError

    p = tmp_path / "c.json"
    p.write_text(json.dumps({"a": "x" * 200}))
    with pytest.raises(AdafuseError, match="more than the 100"):
        read_json(p, limit=100)
    nested: object = 1
    for _ in range(MAX_JSON_DEPTH + 1):
        nested = [nested]
    p.write_text(json.dumps(nested))
    with pytest.raises(AdafuseError, match="nested deeper"):
        read_json(p)
    with pytest.raises(AdafuseError, match="character device"):
        read_json(Path("/dev/zero"))


def test_sigterm_leaves_no_temporary(world):
    """A kill while writing (SIGTERM, as a supervisor sends it) leaves no temporary and no half output."""
    ready = world / "ready"
    script = (f"import sys, time, pathlib\n"
              f"import adafuse_export.onnx.export as e\n"
              f"def stall(*a):\n    pathlib.Path({str(ready)!r}).touch()\n    time.sleep(120)\n"
              f"e._check = stall\n"
              f"from adafuse_export.cli import entry_point\n"
              f"sys.argv = ['adafuse-export', 'export-onnx', {str(world / 'ckpt')!r}, {str(world / 'out' / 'onnx')!r}]\n"
              f"entry_point()\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    t0 = time.time()
    while not ready.exists():
        assert proc.poll() is None and time.time() - t0 < 120, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.1)
    assert any((world / "out").iterdir())  # the temporary export folder exists while it writes
    proc.terminate()
    err = proc.communicate(timeout=30)[1]
    assert proc.returncode == 143 and err.strip() == "error: terminated", err
    assert list((world / "out").iterdir()) == []
