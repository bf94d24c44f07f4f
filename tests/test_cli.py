"""The command line on the built-in examples."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from adafuse_export.converters import load_checkpoint
from adafuse_export.examples import KINDS


def test_formats_lists_registered_converters(cli):
    r = cli("formats")
    assert r.code == 0
    names = [line.split()[0] for line in r.out.splitlines()]
    assert {"adafuse", "peft-lora", "moe-peft"} <= set(names)


def test_inspect_every_example(cli, example_dirs):
    for kind, path in example_dirs.items():
        r = cli("inspect", path, "--json")
        assert r.code == 0, r.err
        info = json.loads(r.out)
        assert info["format"] == "adafuse" and info["family"] == "llama"
        assert info["model"]["num_layers"] == 2 and info["adapter"]["routing"] == KINDS[kind]["routing"]
        ckpt = load_checkpoint(path)
        assert info["adapter_parameters"] == sum(ckpt.adapters.info(n).numel for n in ckpt.adapters.names())
        table = cli("inspect", path)
        assert table.code == 0 and "routing" in table.out and "parameters" in table.out


def test_run_without_adapters_prints_what_transformers_generates(cli, example_dirs, tmp_path):
    """The base model is a Hugging Face directory: transformers' own forward and greedy generate are the oracle."""
    import transformers

    out = tmp_path / "logits.safetensors"
    r = cli("run", example_dirs["pregate"], "--prompt-ids", "5,6,7,8", "--max-new-tokens", "4", "--no-adapters",
            "--save-logits", out)
    assert r.code == 0, r.err
    hf = transformers.AutoModelForCausalLM.from_pretrained(example_dirs["pregate"], dtype=torch.float32).eval()
    prompt = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        generated = hf.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)[0, 4:]
        logits = hf(prompt).logits
    assert r.out.split() == [str(t) for t in generated.tolist()]
    saved = load_file(out)["logits"]
    assert saved.shape == (1, 4, 256) and (saved - logits).abs().max().item() < 1e-4


def test_run_with_adapters_prints_what_onnxruntime_generates(cli, example_dirs, tmp_path):
    """With adapters, the oracle is the exported portable graph executed by ONNX Runtime (another
    implementation of the same model, run by another library), greedy-decoded here."""
    from adafuse_export.onnx.export import export_onnx
    from adafuse_export.runners.onnxruntime import OnnxRuntimeRunner

    out = tmp_path / "logits.safetensors"
    r = cli("run", example_dirs["pregate"], "--prompt-ids", "5,6,7,8", "--max-new-tokens", "4", "--save-logits", out)
    assert r.code == 0, r.err
    export_onnx(load_checkpoint(example_dirs["pregate"]), tmp_path / "onnx", "portable", "float32")
    runner = OnnxRuntimeRunner(tmp_path / "onnx")
    step = runner.prefill(np.array([[5, 6, 7, 8]], dtype=np.int64))
    prompt_logits, generated = step.logits, []
    for _ in range(4):
        generated.append(int(step.logits[0, -1].argmax()))
        step = runner.decode(np.array([[generated[-1]]], dtype=np.int64))
    assert r.out.split() == [str(t) for t in generated]
    saved = load_file(out)["logits"].numpy()
    assert saved.shape == (1, 4, 256) and np.abs(saved - prompt_logits).max() < 1e-4


def test_make_example_refuses_to_overwrite(cli, tmp_path):
    assert cli("make-example", tmp_path / "ex").code == 0
    r = cli("make-example", tmp_path / "ex")
    assert r.code == 2 and "not empty" in r.err and "--force" in r.err
    assert cli("make-example", tmp_path / "ex", "--force", "--kind", "mixlora").code == 0


def test_console_script_help_and_error_without_traceback(tmp_path):
    exe = [sys.executable, "-m", "adafuse_export"]
    help_ = subprocess.run(exe + ["--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "inspect" in help_.stdout
    bad = subprocess.run(exe + ["inspect", str(tmp_path / "nope")], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"error: {tmp_path / 'nope'}: checkpoint directory not found"
    assert "Traceback" not in bad.stderr


def test_bare_command_teaches(cli):
    """Bare `adafuse-export` prints the help (exit 0); the summaries are whole sentences, never cut mid-word;
    the typical session shows the main job."""
    from adafuse_export.cli import cli as group

    r = cli()
    assert r.code == 0 and "Typical session" in r.out and "convert ex/ ex.engine" in r.out
    for name, command in group.commands.items():
        summary = command.get_short_help_str(limit=80)
        assert not summary.endswith("...") and summary.endswith((".", ")")), (name, summary)


def test_help_of_every_command_imports_no_heavy_package():
    """--help works without torch, onnx, onnxruntime or TensorRT installed: none is imported for it."""
    code = ("import sys\n"
            "from adafuse_export.cli import cli, main\n"
            "for args in [['--help']] + [[name, '--help'] for name in cli.commands]:\n"
            "    assert main(args) == 0, args\n"
            "heavy = ('torch', 'onnx', 'onnxruntime', 'tensorrt', 'tensorrt_rtx', 'transformers')\n"
            "print('IMPORTED', [m for m in heavy if m in sys.modules])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "IMPORTED []"


def test_command_modules_do_not_import_the_group():
    """No import circle: the group (cli/__init__.py) imports the command modules, never the reverse."""
    import ast
    from pathlib import Path

    import adafuse_export.cli as package

    folder = Path(package.__file__).parent
    for path in folder.glob("*.py"):
        if path.name == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert node.module not in (None, "__init__"), f"{path.name} imports the cli package"
            if isinstance(node, ast.ImportFrom) and node.level == 2:
                assert node.module != "cli", f"{path.name} imports the cli package"


def test_family_and_kind_choices_come_from_their_registries(cli):
    from adafuse_export.cli import cli as group
    from adafuse_export.families import names

    params = {p.name: p for p in group.commands["make-example"].params}
    assert list(params["family"].type.choices) == list(names()) and "phi3" in names()
    assert list(params["kind"].type.choices) == list(KINDS)


@pytest.mark.parametrize("kind,why", [
    ("lora", "no routing table: it has no pre-gate and no router (routing 'none'): every token takes the same adapter"),
    ("mola", "no routing table: it has no pre-gate: a router in every layer decides there (routing 'layerwise')"),
    ("pregate-ffn", "no routing table: its pre-gate reads 'mlp_norm_0' (after layer 0's attention"),
])
def test_export_routes_says_why_at_once(cli, example_dirs, tmp_path, kind, why):
    """Refused from the configs alone, before torch is imported or a tensor read; nothing written."""
    r = cli("export-routes", example_dirs[kind], tmp_path / "r.safetensors")
    assert r.code == 2 and why in r.err and not (tmp_path / "r.safetensors").exists(), r.err
    code = ("import sys\nfrom adafuse_export.cli import main\n"
            f"assert main(['export-routes', {str(example_dirs[kind])!r}, {str(tmp_path / 'x')!r}]) == 2\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_heartbeat_lines_while_silent_work_runs():
    """A build that reports nothing prints `what: N s` lines meanwhile, and none after it ends."""
    import time

    from adafuse_export.progress import heartbeat

    lines: list[str] = []
    with heartbeat(lines.append, "building", every=0.05):
        time.sleep(0.3)
    count = len(lines)
    time.sleep(0.15)
    assert count >= 3 and len(lines) == count and lines[0].startswith("building: ") and lines[0].endswith(" s")


def test_validate_shows_steps_on_a_terminal(example_dirs, tmp_path):
    """Standalone validate tells each compared step on a terminal's stderr (a pseudo-terminal here), and
    keeps a pipe's output to the report alone."""
    import os
    import pty

    from adafuse_export.onnx.export import export_onnx

    export_onnx(load_checkpoint(example_dirs["lora"]), tmp_path / "o", "portable", "float32")
    args = [sys.executable, "-m", "adafuse_export", "validate", str(example_dirs["lora"]), str(tmp_path / "o"),
            "--steps", "2"]
    master, slave = pty.openpty()
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    err = os.read(master, 65536).decode()
    os.close(master)
    assert p.returncode == 0 and "compared" in err, err
    piped = subprocess.run(args, capture_output=True, text=True)
    assert piped.returncode == 0 and "compared" not in piped.stderr and "PASSED" in piped.stdout
