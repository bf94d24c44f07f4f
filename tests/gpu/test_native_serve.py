"""adafuse-serve and adafuse-generate on the native backend, on the GPU: a converted model of every example kind
and every family served over HTTP gives the CPU reference's greedy tokens, for prompts of different lengths
sent at once (they share in-flight steps), and adafuse-generate prints the same tokens.

Needs the binaries built for this GPU: runtime/tools/build_on_gpu.sh, then ADAFUSE_RUNTIME_LIB=<its output>
(adafuse-serve and adafuse-generate are looked up beside the library, or ADAFUSE_SERVE / ADAFUSE_GENERATE).
"""
from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from adafuse_export.converters import load_checkpoint
from adafuse_export.examples import KINDS, make_example
from adafuse_export.reference import ReferenceModel
from family_decode_cases import attention_head_dim, cases, convert
from http_servers import Servers

pytestmark = pytest.mark.gpu
NEW_TOKENS = 8
PROMPTS = [[3, 1, 4, 1, 5, 9, 2], [2, 7], [1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9]]


def binary(name: str, env: str) -> Path:
    if os.environ.get(env):
        return Path(os.environ[env])
    lib = os.environ.get("ADAFUSE_RUNTIME_LIB")
    assert lib, f"set ADAFUSE_RUNTIME_LIB (or {env}) to the runtime built by runtime/tools/build_on_gpu.sh"
    path = Path(lib).parent / name
    assert path.is_file(), f"{path} is missing: runtime/tools/build_on_gpu.sh builds it beside the library"
    return path


def reference_tokens(ckpt_dir: Path) -> list[list[int]]:
    ref = ReferenceModel(load_checkpoint(ckpt_dir), dtype=torch.float32)
    return [ref.generate(torch.tensor([p]), NEW_TOKENS)[0][0].tolist() for p in PROMPTS]


class Server:
    def __init__(self, engine: Path):
        self.servers = Servers()
        self.url = self.servers.start([binary("adafuse-serve", "ADAFUSE_SERVE"), "--engine", engine, "--host", "127.0.0.1",
                                       "--port", "0"])

    def generate(self, prompt: list[int]) -> list[int]:
        body = json.dumps({"prompt_ids": prompt, "max_new_tokens": NEW_TOKENS}).encode()
        req = urllib.request.Request(self.url + "/v1/generate", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())
        assert answer["finish_reason"] == "length", answer
        return answer["tokens"]

    def close(self) -> None:
        self.servers.close()


def check_served(ckpt_dir: Path, art: Path) -> None:
    want = reference_tokens(ckpt_dir)
    server = Server(art)
    try:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:  # at once: the three prompts share in-flight steps
            got = list(pool.map(server.generate, PROMPTS))
        metrics = urllib.request.urlopen(server.url + "/metrics", timeout=30).read().decode()
    finally:
        server.close()
    assert got == want, f"{art.name}: served {got} != reference {want}"
    assert "adafuse_tokens_generated_total" in metrics
    cmd = [str(binary("adafuse-generate", "ADAFUSE_GENERATE")), "--engine", str(art),
           "--prompt-ids", ",".join(map(str, PROMPTS[0])), "--max-new-tokens", str(NEW_TOKENS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [int(t) for t in proc.stdout.split()] == want[0], f"adafuse-generate: {proc.stdout!r} != {want[0]}"


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_served(tmp_path, kind):
    make_example(tmp_path / kind, kind, "llama")
    check_served(tmp_path / kind, convert(tmp_path / kind, tmp_path / f"{kind}.native"))


@pytest.mark.parametrize("name,family,config", cases())
def test_every_family_served(tmp_path, name, family, config):
    make_example(tmp_path / name, "pregate", family=family, config=attention_head_dim(config))
    check_served(tmp_path / name, convert(tmp_path / name, tmp_path / f"{name}.native"))
