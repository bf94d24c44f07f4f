"""adafuse-serve over HTTP on the native backend, on the GPU: concurrent streamed requests of different lengths
(joining and leaving in-flight steps through the service's scheduler) each get the CPU reference's greedy tokens
for its prompt decoded alone, read by benchmarks/serve_load.py's load driver.

Needs runtime/tools/build_on_gpu.sh's build: adafuse-serve beside ADAFUSE_RUNTIME_LIB (build/gpu-native/runtime/).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from adafuse_export import native_artifact as native
from adafuse_export.converters import load_checkpoint
from adafuse_export.examples import make_example
from adafuse_export.reference import ReferenceModel
from benchmark_scripts import load

pytestmark = pytest.mark.gpu
serve_load = load("serve_load")
MAX_SEQ = 40


@pytest.fixture(scope="module")
def serve_binary() -> Path:
    lib = os.environ.get("ADAFUSE_RUNTIME_LIB")
    assert lib, "set ADAFUSE_RUNTIME_LIB to the runtime built by runtime/tools/build_on_gpu.sh"
    path = Path(lib).parent / "adafuse-serve"
    assert path.is_file(), f"{path}: not built (runtime/tools/build_on_gpu.sh builds it beside the library)"
    return path


@pytest.mark.parametrize("kind", ["pregate", "lora"])
def test_concurrent_streams_equal_the_reference_alone(serve_binary, tmp_path, kind):
    make_example(tmp_path / "ck", kind, "llama")
    ckpt = load_checkpoint(tmp_path / "ck")
    art = tmp_path / "model.native"
    art.mkdir()
    native.write_artifact(ckpt, art, "float32", max_batch=4, max_seq=MAX_SEQ)
    mix = serve_load.request_mix(16, 3, (1, 24), (1, MAX_SEQ - 24), ckpt.model.vocab_size)
    ref = ReferenceModel(ckpt, dtype=torch.float32)
    want = {r: ref.generate(torch.tensor([list(r.prompt_ids)]), r.max_new_tokens)[0][0].tolist() for r in set(mix)}
    proc, url = serve_load.start_server(serve_binary, art, tmp_path / "serve.log", ["--queue", "64"])
    try:
        client = serve_load.ServeClient(url)
        health = client.health()
        assert (health["status"], health["max_batch"], health["max_seq"]) == ("ok", 4, MAX_SEQ)
        got = []

        def send(req):
            record = client.generate(req)
            got.append((req, record))
            return record

        level = serve_load.run_level(send, mix, 6, max_seconds=300)  # 6 clients, 4 slots: some wait in the queue
        assert (level["requests"], level["completed"], level["errors"]) == (16, 16, 0), level["error_samples"]
        for req, record in got:
            assert record.tokens == want[req], (len(req.prompt_ids), record.tokens, want[req])
    finally:
        serve_load.stop_server(proc)
