"""benchmarks/serve_load.py on the CPU: its statistics against numpy and hand-computed cases, its request mix,
and the load driver against the real HTTP service over the replay backend (runtime/tests/replay_server_main.cpp:
logits recorded in a file, so every request's greedy tokens are known in advance)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from benchmark_scripts import BENCHMARKS, load
from http_servers import Servers

serve_load = load("serve_load")
synthetic = load("synthetic_checkpoint")

POSITIONS, VOCAB = 64, 256


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101, 1000])
def test_percentile_equals_numpy(n):
    values = list(np.random.default_rng(n).exponential(size=n))
    for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
        assert serve_load.percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12, abs=1e-15)
    assert serve_load.percentile([], 50) is None


def test_summary_of_known_records():
    R = serve_load.Record
    records = [
        R(10, 3, sent=0.0, token_times=[0.5, 0.6, 0.8], tokens=[1, 2, 3]),
        R(20, 2, sent=1.0, token_times=[1.2, 1.5], tokens=[4, 5]),
        R(30, 4, sent=2.0, token_times=[2.1], tokens=[6]),  # short: an error, its token still generated
        R(40, 2, sent=2.0, error="HTTP 503: queue full"),
    ]
    s = serve_load.summarize(4, records, wall_s=2.0)
    assert (s["requests"], s["completed"], s["errors"], s["generated_tokens"], s["prompt_tokens"]) == (4, 2, 2, 6, 100)
    assert s["throughput_tok_s"] == 3.0
    assert s["error_samples"] == ["1 tokens, expected 4", "HTTP 503: queue full"]
    # TTFT of the good ones: 500 and 200 ms; gaps: 100, 200, 300 ms
    assert s["ttft_ms"] == {"p50": pytest.approx(350.0), "p99": pytest.approx(float(np.percentile([500, 200], 99)))}
    assert s["itl_ms"] == {"p50": pytest.approx(200.0), "p99": pytest.approx(float(np.percentile([100, 200, 300], 99)))}
    assert s["latency_ms"]["p50"] == pytest.approx(650.0)
    assert s["first_tokens"] == []  # no record knows its place in a mix here


def test_agreement_counts_equal_first_tokens_of_requests_both_completed():
    a = {"levels": [{"concurrency": 1, "first_tokens": [[1, 2, 3, 4], [5, 6, 7, 8], None, [9, 9, 9, 9]]}]}
    b = {"levels": [{"concurrency": 1, "first_tokens": [[1, 2, 3, 4], [5, 0, 0, 0], [1, 1, 1, 1], [8, 9, 9, 9]]}]}
    assert serve_load.agreement(a, b) == [{"concurrency": 1, "compared": 3, "first_token_equal": 2,
                                           f"first_{serve_load.FIRST_TOKENS}_equal": 1}]


def test_request_mix_is_fixed_by_its_seed_and_stays_in_range():
    mix = serve_load.request_mix(400, 7, (16, 2048), (16, 128), 32000)
    assert mix == serve_load.request_mix(400, 7, (16, 2048), (16, 128), 32000)
    assert mix != serve_load.request_mix(400, 8, (16, 2048), (16, 128), 32000)
    lengths = [len(r.prompt_ids) for r in mix]
    assert min(lengths) >= 16 and max(lengths) <= 2048 and all(0 <= t < 32000 for r in mix for t in r.prompt_ids)
    assert all(16 <= r.max_new_tokens <= 128 for r in mix)
    # log-uniform: about as many prompts in [16, 181) as in [181, 2048]
    assert 0.4 < sum(n < 181 for n in lengths) / len(lengths) < 0.6


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> tuple[Path, np.ndarray]:
    logits = np.random.default_rng(3).normal(size=(1, POSITIONS, VOCAB)).astype(np.float32)
    path = tmp_path_factory.mktemp("serve_load") / "logits.safetensors"
    save_file({"logits": logits}, str(path))
    return path, logits[0]


@pytest.fixture
def replay_server(native_build, recorded):
    with Servers() as servers:
        yield lambda *options: servers.start([native_build / "runtime/tests/adafuse_replay_server_for_tests", "--logits",
                                              recorded[0], "--port", "0", *options])


def expected_tokens(logits: np.ndarray, req) -> list[int]:
    """The replay backend answers position p with row p: greedy token i of a prompt of L is argmax(row L-1+i)."""
    start = len(req.prompt_ids) - 1
    return [int(np.argmax(logits[p])) for p in range(start, start + req.max_new_tokens)]


def recording(generate):
    """(send for run_level, the list of (request, record) pairs it fills as the clients finish)."""
    records: list = []

    def send(req):
        record = generate(req)
        records.append((req, record))
        return record
    return send, records


def test_driver_completes_every_request_with_the_recorded_tokens(replay_server, recorded):
    url = replay_server("--max-batch", "4", "--step-delay-ms", "3")
    client = serve_load.ServeClient(url)
    mix = serve_load.request_mix(12, 5, (4, 24), (2, 12), VOCAB)
    send, records = recording(client.generate)
    level = serve_load.run_level(send, mix, 4, max_seconds=60)
    assert (level["requests"], level["completed"], level["errors"]) == (12, 12, 0), level["error_samples"]
    assert level["generated_tokens"] == sum(r.max_new_tokens for r in mix)
    assert sorted(len(req.prompt_ids) for req, _ in records) == sorted(len(r.prompt_ids) for r in mix)
    for req, record in records:
        assert record.error is None and record.tokens == expected_tokens(recorded[1], req)
        assert record.sent < record.token_times[0] and record.token_times == sorted(record.token_times)
    # every step sleeps 3 ms and a request gets one token per step: read as they arrive, the gaps are at least that
    assert level["itl_ms"]["p50"] >= 2.5 and level["ttft_ms"]["p50"] >= 2.5
    gaps = [b - a for _, r in records for a, b in zip(r.token_times, r.token_times[1:])]
    assert level["itl_ms"]["p99"] == pytest.approx(1000 * float(np.percentile(gaps, 99)), abs=1e-3)


def test_refused_requests_are_errors_with_the_service_message(replay_server):
    url = replay_server("--max-batch", "2")
    too_long = [serve_load.Request(tuple(range(POSITIONS)), 4), serve_load.Request((1, 2, 3), 2)]
    level = serve_load.run_level(serve_load.ServeClient(url).generate, too_long, 2, max_seconds=60)
    assert (level["requests"], level["completed"], level["errors"]) == (2, 1, 1)
    assert len(level["error_samples"]) == 1 and level["error_samples"][0].startswith("HTTP 400: ")


def test_cli_against_a_running_service_writes_the_table_and_json(replay_server, recorded, tmp_path):
    url = replay_server("--max-batch", "4", "--step-delay-ms", "1")
    out = tmp_path / "serve_load.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "serve_load.py"), "--url", url, "--label", "replay",
                           "--concurrency", "1,3", "--requests", "6", "--prompt-lengths", "4..24", "--output-lengths",
                           "2..12", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "TTFT p50" in proc.stdout and proc.stdout.count("\nreplay ") >= 2
    report = json.loads(out.read_text())
    assert {"benchmark", "schema", "created", "config", "prep_s", "systems",
            "agreement_adafuse_dense_vs_transformers"} == report.keys()
    assert report["benchmark"] == "serve_load" and report["schema"] == serve_load.SCHEMA
    assert report["config"]["load"] == "closed-loop" and report["config"]["vocab"] == VOCAB
    [system] = report["systems"]
    assert system["name"] == "replay" and system["health"]["max_batch"] == 4
    assert [level["concurrency"] for level in system["levels"]] == [1, 3]
    for level, seed_offset in zip(system["levels"], (1, 3)):
        mix = serve_load.request_mix(6, 0 + seed_offset, (4, 24), (2, 12), VOCAB)
        assert {"concurrency", "requests", "completed", "errors", "error_samples", "generated_tokens", "wall_s",
                "throughput_tok_s", "ttft_ms", "itl_ms", "latency_ms", "prompt_tokens", "first_tokens"} == level.keys()
        assert (level["requests"], level["completed"], level["errors"]) == (6, 6, 0)
        assert level["generated_tokens"] == sum(r.max_new_tokens for r in mix)
        assert level["first_tokens"] == [expected_tokens(recorded[1], r)[:serve_load.FIRST_TOKENS] for r in mix]
        assert level["throughput_tok_s"] == pytest.approx(level["generated_tokens"] / level["wall_s"], rel=1e-2)
        for metric in ("ttft_ms", "itl_ms", "latency_ms"):
            assert 0 < level[metric]["p50"] <= level[metric]["p99"]


def test_cli_refusals_are_one_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, str(BENCHMARKS / "serve_load.py"), *args], capture_output=True, text=True,
                              timeout=60)
    proc = run("--concurrency", "1,x")
    assert proc.returncode == 2 and "--concurrency: expected concurrencies like 1,4,16,64, found '1,x'" in proc.stderr
    proc = run("--prompt-lengths", "20..10")
    assert proc.returncode == 2 and "expected 1 <= LOW <= HIGH, found '20..10'" in proc.stderr
    proc = run("--url", "ftp://x")
    assert proc.returncode == 2 and proc.stderr.endswith("serve_load.py: error: --url ftp://x: expected http://HOST:PORT\n")
    proc = run("--url", "http://127.0.0.1:1")  # nothing listens on port 1
    last = proc.stderr.splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("serve_load.py: error: --url http://127.0.0.1:1: GET /health failed: ")
    assert "Traceback" not in proc.stderr
    proc = run("--serve", sys.executable, "--ckpt", str(tmp_path), "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 2 and f"--ckpt {tmp_path}: not a synthetic checkpoint" in proc.stderr
    proc = run("--serve", sys.executable, "--shape", "tiny", "--max-seq", "100000", "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"serve_load.py: preparing the models in {tmp_path / 'w'}: --max-seq 100000: ")
    shutil.rmtree(tmp_path / "w")
    proc = run("--serve", str(tmp_path / "none"), "--workdir", str(tmp_path))
    assert proc.returncode == 2 and f"--serve {tmp_path / 'none'}: not found" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written before the refusal


def test_dense_base_converts_to_the_moe_artifacts_weights_without_adapters(tmp_path):
    """The dense system is the MoE checkpoint's base (Checkpoint.base_only()): the same weights, byte for byte, and no
    adapter (the synthetic checkpoint has no static LoRA that conversion would merge into the base)."""
    import torch
    from safetensors.torch import load_file

    from adafuse_export import native_artifact as native
    from adafuse_export.converters import load_checkpoint

    synthetic.write_synthetic(tmp_path / "moe", "tiny", experts=4, rank=8, log=lambda _: None)
    manifests = {}
    moe_ckpt = load_checkpoint(tmp_path / "moe")
    for name, ckpt in (("moe", moe_ckpt), ("dense", moe_ckpt.base_only())):
        (tmp_path / f"{name}.native").mkdir()
        manifests[name] = native.write_artifact(ckpt, tmp_path / f"{name}.native", "bfloat16", max_batch=4, max_seq=64)
    moe, dense = (load_file(str(tmp_path / f"{n}.native" / native.WEIGHTS)) for n in ("moe", "dense"))
    assert moe.keys() == dense.keys() and all(torch.equal(moe[k], dense[k]) for k in moe)
    assert manifests["moe"]["routing"]["kind"] == "pregate" and manifests["moe"]["routing"]["routes_file"]
    assert manifests["dense"]["routing"]["kind"] == "none" and manifests["dense"]["routing"]["routes_file"] is None
    assert all(st["adapter"] is None for layer in manifests["dense"]["layers"] for st in layer["stages"])
    assert sorted(manifests["dense"]["files"]) == [native.WEIGHTS]



def test_gpu_run_prepares_reuses_and_reports_a_server_that_cannot_start(native_build, tmp_path):
    """The run without --url on the CPU: the checkpoint, its dense base and both artifacts are written (and reused
    by a second run), adafuse-serve opens each and stops at the device: both systems are reported skipped with
    its one line, the JSON is still written, the exit status is 1."""
    def run():
        return subprocess.run([sys.executable, str(BENCHMARKS / "serve_load.py"), "--shape", "tiny", "--layers", "1",
                               "--experts", "4", "--rank", "8", "--max-batch", "4", "--prompt-lengths", "4..24",
                               "--output-lengths", "2..8", "--systems", "moe,dense", "--workdir", str(tmp_path / "work"),
                               "--serve", str(native_build / "runtime/adafuse-serve"), "--out", str(tmp_path / "out.json")],
                              capture_output=True, text=True, timeout=300)
    first = run()
    assert first.returncode == 1, first.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    assert set(report["prep_s"]) == {"write_checkpoint", "convert_moe", "convert_dense"}
    assert report["config"]["model"] == {"shape": "tiny", "layers": 1, "shape_layers": 2, "experts": 4, "rank": 8,
                                         "routing": "pregate (routing table)", "dtype": "bfloat16", "max_batch": 4,
                                         "max_seq": 32}
    assert [s["name"] for s in report["systems"]] == ["adafuse-moe", "adafuse-dense"]
    for system in report["systems"]:
        assert "levels" not in system and system["skipped"].startswith(
            f"adafuse-serve did not start: adafuse-serve: CUDA device 0 (running {system['artifact']} needs an NVIDIA GPU): ")
    assert re.search(r"^adafuse-dense +skipped: adafuse-serve did not start", first.stdout, re.M)
    second = run()
    assert second.returncode == 1 and json.loads((tmp_path / "out.json").read_text())["prep_s"] == {}
    assert second.stdout.count("reusing ") == 3


def test_transformers_driver_streams_every_token_of_model_generate(tmp_path):
    """The transformers side on the CPU (float32, a small paged cache): concurrent streamed requests through
    ContinuousBatchingManager each end with exactly their tokens, equal to model.generate's greedy ones."""
    import torch

    synthetic.write_synthetic(tmp_path / "moe", "tiny", experts=4, rank=8, log=lambda _: None)
    cb = serve_load.TransformersCB(tmp_path / "moe", "cpu", 12, dtype="float32",
                                   cb_config={"num_blocks": 32, "max_batch_tokens": 128, "page_size": 16})
    try:
        mix = serve_load.request_mix(6, 1, (4, 24), (2, 12), 128)
        send, records = recording(cb.generate)
        level = serve_load.run_level(send, mix, 3, max_seconds=120)
        assert (level["requests"], level["completed"], level["errors"]) == (6, 6, 0), level["error_samples"]
        for req, record in records:
            want = cb.model.generate(torch.tensor([req.prompt_ids]), max_new_tokens=req.max_new_tokens,
                                     min_new_tokens=req.max_new_tokens, do_sample=False)[0, len(req.prompt_ids):].tolist()
            assert record.tokens == want and len(record.token_times) == req.max_new_tokens
            assert record.sent < record.token_times[0]
    finally:
        cb.close()
