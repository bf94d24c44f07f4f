"""The C++ runtime (runtime/): build, ctest, install + find_package, the C API through ctypes against
files the Python side writes, the HTTP service with a real HTTP client, adafuse-generate.

Uses the project's native build (tests/native_build.py: cmake + nvcc + g++; Debian packages
nlohmann-json3-dev, libcpp-httplib-dev, libgtest-dev). Nothing here needs
TensorRT or a GPU: engine execution is what only a TensorRT machine can show (runtime/README.md).
The HTTP service runs over ReplayBackendForTests (runtime/tests), replaying logits recorded by
`adafuse-export run --save-logits`, on 127.0.0.1 only.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from adafuse_export.errors import AdafuseError
from http_servers import Servers

REPO = Path(__file__).resolve().parents[1]
RUNTIME = REPO / "runtime"
PROMPT = [1, 2, 3]


def _tail(text: str, n: int = 6000) -> str:
    return text[-n:]


def _run(cmd: list[str], limit: int, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=limit, **kw)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{_tail(proc.stdout)}\n{_tail(proc.stderr)}")
    return proc


def _cli(*args, limit: int = 300) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return _run([sys.executable, "-m", "adafuse_export", *args], limit, env=env).stdout


@pytest.fixture(scope="session")
def runtime_build(native_build) -> Path:
    """runtime/'s part of the project's native build (tests/native_build.py)."""
    return native_build / "runtime"


@pytest.fixture(scope="session")
def runtime_lib(runtime_build, monkeypatch_session) -> str:
    lib = str(runtime_build / "libadafuse_runtime.so")
    monkeypatch_session.setenv("ADAFUSE_RUNTIME_LIB", lib)
    return lib


@pytest.fixture(scope="session")
def monkeypatch_session():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, engine): the pregate example converted by `adafuse-export convert` (TensorRT-RTX)."""
    root = tmp_path_factory.mktemp("runtime_engine")
    _cli("make-example", root / "ck")
    _cli("convert", root / "ck", root / "out.engine")
    return root / "ck", root / "out.engine"


def test_ctest_passes(runtime_build):
    proc = subprocess.run(["ctest", "--output-on-failure", "-j", "2", "--timeout", "120"], cwd=runtime_build,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, _tail(proc.stdout + proc.stderr)
    assert "tests passed" in proc.stdout


def test_installed_runtime_links_into_a_consumer_with_find_package(runtime_build, converted, tmp_path):
    prefix = tmp_path / "prefix"
    _run(["cmake", "--install", runtime_build, "--prefix", prefix], 120)
    assert (prefix / "include/adafuse/runtime.h").is_file()
    consumer = tmp_path / "consumer"
    _run(["cmake", "-S", RUNTIME / "tests/consumer", "-B", consumer, f"-DCMAKE_PREFIX_PATH={prefix}"], 120)
    _run(["cmake", "--build", consumer], 120)
    _, engine = converted
    out = _run([consumer / "consumer", engine], 60).stdout.splitlines()
    assert out[0] == "version 0.1.0 plugin 1"
    assert out[1] == "greedy 1"
    assert out[2] == (f"open status 3: {engine}: built with tensorrt-rtx 1.7.1.116; this runtime runs full TensorRT "
                      "engines (convert with --backend tensorrt)")
    # Only the C API leaves the shared library.
    nm = _run(["nm", "-D", "--defined-only", prefix / "lib/libadafuse_runtime.so"], 60).stdout
    exported = {line.split()[-1] for line in nm.splitlines() if len(line.split()) == 3}
    assert exported and all(name.startswith("adafuse_") for name in exported), sorted(exported)[:10]


def test_plugin_version_matches_the_exporter(runtime_lib):
    from adafuse_export.onnx import plugin_ops
    from adafuse_export.runners.cpp_runtime import load_library

    assert load_library().adafuse_plugin_version().decode() == plugin_ops.PLUGIN_VERSION


def _break_engine(src_engine: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src_engine.parent, dst)
    engine = dst / src_engine.name
    manifest_file = engine.with_suffix(".json")
    manifest = json.loads(manifest_file.read_text())
    if how == "engine modified":
        engine.write_bytes(engine.read_bytes()[:-1] + b"x")
    elif how == "engine missing":
        engine.unlink()
    elif how == "listed file modified":
        (dst / "out.onnx/decoder.onnx").write_bytes(b"edited")
    elif how == "listed file missing":
        (dst / "out.onnx/routes.safetensors").unlink()
    elif how == "plugin version":
        manifest["plugin"] = {"library": "libadafuse_trt_plugins.so", "name": "AdafuseLoraLinear", "version": "2"}
    elif how == "manifest version":
        manifest["version"] = 1  # the first contract (one length per batch)
    elif how == "format":
        manifest["format"] = "something-else"
    elif how == "manifest missing":
        manifest_file.unlink()
    if how in ("plugin version", "manifest version", "format"):
        manifest_file.write_text(json.dumps(manifest))
    return engine


@pytest.mark.parametrize("how", ["engine modified", "engine missing", "listed file modified", "listed file missing",
                                 "plugin version", "manifest version", "format", "manifest missing"])
def test_manifest_refusals_match_python_word_for_word(runtime_lib, converted, tmp_path, how):
    from adafuse_export.runners.cpp_runtime import verify_manifest
    from adafuse_export.trt.manifest import verify_engine

    engine = _break_engine(converted[1], tmp_path / "e", how)
    with pytest.raises(AdafuseError) as python:
        verify_engine(engine)
    with pytest.raises(AdafuseError) as cpp:
        verify_manifest(engine)
    assert str(cpp.value) == str(python.value)


def test_bad_manifest_json_is_refused_naming_the_file(runtime_lib, converted, tmp_path):
    from adafuse_export.runners.cpp_runtime import verify_manifest

    engine = _break_engine(converted[1], tmp_path / "e", "none")
    engine.with_suffix(".json").write_text('{"format": "adafuse-engine",')
    with pytest.raises(AdafuseError, match=f"^{engine.with_suffix('.json')}: invalid JSON at byte 29: "):
        verify_manifest(engine)


def test_good_manifest_reads_as_python_reads_it(runtime_lib, converted):
    from adafuse_export.runners.cpp_runtime import verify_manifest
    from adafuse_export.trt.manifest import verify_engine

    assert verify_manifest(converted[1]) == verify_engine(converted[1])


@pytest.mark.parametrize("kind", ["pregate-ffn", "mola"])
def test_engine_open_reads_the_contract_of_every_routing_kind(runtime_lib, tmp_path, kind):
    """Routes from a table (pregate, below), from a pre-gate inside the decoder (pregate-ffn), per layer (mola)."""
    from adafuse_export.runners import open_runner

    _cli("make-example", "--kind", kind, tmp_path / "ck")
    _cli("convert", tmp_path / "ck", tmp_path / "out.engine")
    # The decoder contract checks come first; this engine then stops at its TensorRT-RTX backend.
    with pytest.raises(AdafuseError, match=f"^{tmp_path}/out.engine: built with tensorrt-rtx 1.7.1.116; this runtime runs full"):
        open_runner(tmp_path / "out.engine", runtime="cpp")


def test_engine_open_passes_every_check_before_tensorrt(runtime_lib, converted, tmp_path):
    from adafuse_export.runners import open_runner

    _, engine = converted
    with pytest.raises(AdafuseError, match="built with tensorrt-rtx 1.7.1.116; this runtime runs full TensorRT engines"):
        open_runner(engine, runtime="cpp")
    # The same engine described as a full-TensorRT one gets as far as loading TensorRT, absent here.
    e = _break_engine(engine, tmp_path / "e", "none")
    manifest = json.loads(e.with_suffix(".json").read_text())
    manifest["engine"]["backend"] = "tensorrt"
    e.with_suffix(".json").write_text(json.dumps(manifest))
    with pytest.raises(AdafuseError) as err:
        open_runner(e, runtime="cpp", tensorrt_library=str(tmp_path / "libnvinfer.so.10"))
    assert str(err.value).startswith(f"TensorRT not found: this runtime needs TensorRT 10.x (tried {tmp_path}/libnvinfer.so.10: ")


def test_routing_lookup_equals_export_routes_and_the_reference_pregate(runtime_lib, converted, tmp_path):
    from safetensors.numpy import load_file

    from adafuse_export.converters import load_checkpoint
    from adafuse_export.runners.cpp_runtime import RoutingTable
    from adafuse_export.runners.reference import ReferenceRunner

    ckpt, _ = converted
    routes = tmp_path / "routes.safetensors"
    _cli("export-routes", ckpt, routes)
    table = RoutingTable(routes)
    file = load_file(str(routes))
    assert (table.vocab, table.top_k) == file["expert_ids"].shape
    ids = np.arange(table.vocab, dtype=np.int64)[None, :]
    got_ids, got_gates = table.lookup(ids)
    np.testing.assert_array_equal(got_ids[0], file["expert_ids"])
    np.testing.assert_array_equal(got_gates[0], file["gates"])
    # Independently: the pre-gate the reference model computes in its forward pass, token by token.
    step = ReferenceRunner(load_checkpoint(ckpt)).prefill(ids)
    np.testing.assert_array_equal(got_ids, step.expert_ids)
    np.testing.assert_allclose(got_gates, step.gates, rtol=1e-5, atol=1e-6)
    with pytest.raises(AdafuseError, match=rf"^token id {table.vocab} is out of the routing table's vocabulary \[0, {table.vocab}\)$"):
        table.lookup(np.array([table.vocab]))


def _expected_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """float64 reference: softmax(l / t) over the top-k, then the smallest prefix reaching top_p, renormalised."""
    order = np.argsort(-logits.astype(np.float64), kind="stable")
    keep = order[:top_k] if top_k else order
    w = np.exp((logits[keep].astype(np.float64) - logits[keep[0]]) / temperature)
    p = w / w.sum()
    n = int(np.searchsorted(np.cumsum(p), top_p - 1e-12) + 1) if top_p < 1 else len(keep)
    out = np.zeros(len(logits))
    out[keep[:n]] = w[:n] / w[:n].sum()
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.75), (0.9, 8, 0.9)])
def test_sampling_through_the_c_api_follows_the_distribution(runtime_lib, temperature, top_k, top_p):
    from adafuse_export.runners.cpp_runtime import Sampler

    logits = np.random.default_rng(3).normal(size=12).astype(np.float32) * 1.5
    want = _expected_distribution(logits, temperature, top_k, top_p)
    n = 20000
    s = Sampler(temperature, top_k, top_p, seed=11)
    counts = np.bincount([s.next(logits) for _ in range(n)], minlength=12)
    assert (counts[want == 0] == 0).all(), "a token outside top-k / top-p was drawn"
    live = want > 0
    chi2 = float((((counts[live] - n * want[live]) ** 2) / (n * want[live])).sum())
    # 99.99th percentile of chi-square with 11 degrees of freedom: 37.3 (fewer dof: lower).
    assert chi2 < 37.3, (chi2, counts, want)


def test_sampling_seed_fixes_ids_and_greedy_is_argmax(runtime_lib):
    from adafuse_export.runners.cpp_runtime import Sampler

    logits = np.random.default_rng(5).normal(size=64).astype(np.float32)

    def draw(seed):
        s = Sampler(1.0, 20, 0.95, seed)
        return [s.next(logits) for _ in range(50)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    assert Sampler().next(logits) == int(np.argmax(logits))
    with pytest.raises(AdafuseError, match=r"^sampling top_p must be in \(0, 1\] \(1: off\), found 1.500000$"):
        Sampler(1.0, 0, 1.5)


# ---- the HTTP service over recorded logits -------------------------------------------------------

@pytest.fixture(scope="module")
def recording(converted, tmp_path_factory) -> tuple[Path, list[int]]:
    """(logits file, greedy continuation of PROMPT): the reference's greedy run, re-run as one prompt
    with --save-logits, so the recording holds the logits of every position of that run."""
    ckpt, _ = converted
    generated = [int(t) for t in _cli("run", ckpt, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "8").split()]
    path = tmp_path_factory.mktemp("recording") / "logits.safetensors"
    _cli("run", ckpt, "--prompt-ids", ",".join(map(str, PROMPT + generated[:-1])), "--max-new-tokens", "1",
         "--save-logits", path)
    return path, generated


@pytest.fixture
def start_server(runtime_build, recording):
    with Servers() as servers:
        yield lambda *options: servers.start([runtime_build / "tests/adafuse_replay_server_for_tests", "--logits",
                                              recording[0], "--host", "127.0.0.1", "--port", "0", *options])


def _post(url: str, body, timeout: float = 30) -> tuple[int, str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/generate", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _get(url: str, path: str) -> str:
    with urllib.request.urlopen(url + path, timeout=30) as r:
        return r.read().decode()


def test_service_greedy_generation_equals_the_reference_run(start_server, recording):
    url = start_server()
    code, body = _post(url, {"prompt_ids": PROMPT, "max_new_tokens": 8})
    assert code == 200, body
    assert json.loads(body) == {"tokens": recording[1], "finish_reason": "length"}
    stop = recording[1][3]
    code, body = _post(url, {"prompt_ids": PROMPT, "max_new_tokens": 8, "stop_ids": [stop]})
    assert json.loads(body) == {"tokens": recording[1][:recording[1].index(stop) + 1], "finish_reason": "stop"}
    health = json.loads(_get(url, "/health"))
    assert health["status"] == "ok" and health["vocab"] == 256 and health["max_seq"] == len(PROMPT) + 7


def test_service_streams_one_line_per_token(start_server, recording):
    url = start_server()
    code, body = _post(url, {"prompt_ids": PROMPT, "max_new_tokens": 5, "stream": True})
    assert code == 200
    lines = [json.loads(line) for line in body.splitlines()]
    assert [line["token"] for line in lines[:-1]] == recording[1][:5]
    assert lines[-1] == {"tokens": recording[1][:5], "finish_reason": "length"}


def test_service_sampling_is_reproducible_per_seed(start_server):
    url = start_server()
    ask = {"prompt_ids": PROMPT, "max_new_tokens": 8, "temperature": 1.5, "top_k": 50, "top_p": 0.95}
    a = [json.loads(_post(url, dict(ask, seed=s))[1])["tokens"] for s in (1, 1, 2)]
    assert a[0] == a[1] and a[0] != a[2]


@pytest.mark.parametrize("body,reason", [
    (b'{"prompt_ids": [1, 2', "malformed JSON at byte 21"),
    (b"[1, 2]", "expected a JSON object, found array"),
    ({"max_new_tokens": 2}, "'prompt_ids' is required (a list of token ids)"),
    ({"prompt_ids": [1, 256]}, "prompt_ids[1] = 256 is out of the vocabulary [0, 256)"),
    ({"prompt_ids": [1, -1]}, "prompt_ids[1] = -1 is out of the vocabulary [0, 256)"),
    ({"prompt_ids": list(range(11))}, "prompt of 11 tokens is longer than the engine's profile (max_seq 10)"),
    ({"prompt_ids": PROMPT, "max_new_tokens": 9}, "prompt of 3 tokens + max_new_tokens 9 exceed the engine's profile (max_seq 10)"),
    ({"prompt_ids": PROMPT, "max_new_tokens": 0}, "'max_new_tokens' must be an integer in [1, 2147483647], found 0"),
    ({"prompt_ids": PROMPT, "temperature": "hot"}, "'temperature' must be a number, found \"hot\""),
    ({"prompt_ids": PROMPT, "top_p": 0}, "sampling top_p must be in (0, 1] (1: off), found 0.000000"),
    ({"prompt_ids": PROMPT, "max_new_tokens": 2, "stop_ids": [300]}, "stop id 300 is out of the vocabulary [0, 256)"),
    ({"prompt_ids": PROMPT, "stream": "yes"}, "'stream' must be true or false, found \"yes\""),
    ({"prompt_ids": PROMPT, "max_tokens": 3}, "unknown field 'max_tokens'"),
    (b'{"prompt_ids": [1e400]}', "malformed JSON: [json.exception.out_of_range.406] number overflow parsing '1e400'"),
    # ids nlohmann holds as unsigned (2^63 .. 2^64 - 1) were converted to int64 and shown wrapped (-1)
    ({"prompt_ids": [1, 2**64 - 1]}, "prompt_ids[1] = 18446744073709551615 is not a token id (ids lie below 2^63)"),
    ({"prompt_ids": [2**63]}, "prompt_ids[0] = 9223372036854775808 is not a token id (ids lie below 2^63)"),
    ({"prompt_ids": PROMPT, "max_new_tokens": 2, "stop_ids": [2**63 + 1]}, "stop_ids[0] = 9223372036854775809 is not a token id (ids lie below 2^63)"),
])
def test_service_answers_bad_requests_with_400_and_one_line(start_server, body, reason):
    url = start_server()
    code, text = _post(url, body)
    assert code == 400, text
    assert text.count("\n") == 1 and json.loads(text) == {"error": reason}
    assert json.loads(_get(url, "/health"))["status"] == "ok"  # and it keeps serving


def _concurrently(url: str, bodies: list[dict], after_first=None) -> list[tuple[int, str]]:
    """POSTs every body from its own thread; after_first() runs between the first and the rest."""
    results: list = [None] * len(bodies)

    def one(i):
        results[i] = _post(url, bodies[i], timeout=60)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for i, t in enumerate(threads):
        t.start()
        if i == 0 and after_first is not None:
            after_first()
    for t in threads:
        t.join(timeout=90)
    return results


def _wait_until_running(url: str) -> None:
    for _ in range(200):  # up to 10 s
        if "adafuse_active_sequences 1\n" in _get(url, "/metrics"):
            return
        time.sleep(0.05)
    raise AssertionError("the first request never started")


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


def test_service_decodes_queued_requests_together(start_server, recording):
    # Each step takes 300 ms: requests 2-4 arrive while request 1 runs (900 ms), wait in the queue,
    # and then run as one batch: one prefill and one decode step per token for all three.
    url = start_server("--step-delay-ms", "300", "--max-batch", "4")
    ask = {"prompt_ids": PROMPT, "max_new_tokens": 3}
    results = _concurrently(url, [ask] * 4, after_first=lambda: _wait_until_running(url))
    assert all(code == 200 and json.loads(body)["tokens"] == recording[1][:3] for code, body in results), results
    metrics = _get(url, "/metrics")
    assert _metric(metrics, 'adafuse_step_latency_seconds_count{phase="prefill"}') == 2
    assert _metric(metrics, 'adafuse_step_latency_seconds_count{phase="decode"}') == 4
    assert _metric(metrics, "adafuse_tokens_generated_total") == 12
    assert _metric(metrics, 'adafuse_requests_total{code="200"}') == 4
    assert _metric(metrics, "adafuse_queue_depth") == 0
    assert 'adafuse_step_latency_seconds_bucket{phase="decode",le="+Inf"} 4' in metrics


def test_service_bounds_its_queue(start_server, recording):
    url = start_server("--step-delay-ms", "200", "--max-batch", "1", "--queue", "1")
    results = _concurrently(url, [{"prompt_ids": PROMPT, "max_new_tokens": 2}] * 4,
                            after_first=lambda: _wait_until_running(url))
    codes = sorted(code for code, _ in results)
    assert codes.count(503) >= 1 and codes.count(200) >= 2, results  # the running request and the queued one
    for code, body in results:
        if code == 503:
            assert json.loads(body) == {"error": "the request queue is full; retry later"}
        else:
            assert json.loads(body)["tokens"] == recording[1][:2]
    assert _metric(_get(url, "/metrics"), 'adafuse_requests_total{code="503"}') == codes.count(503)


def _requests_counted(url: str) -> dict[str, float]:
    """adafuse_requests_total by status code."""
    return {m[0]: float(m[1]) for m in re.findall(r'^adafuse_requests_total\{code="(\d+)"\} (\S+)$', _get(url, "/metrics"), re.M)}


def _poll(fn, limit: float = 10.0):
    """fn() once it is truthy (every 50 ms, up to `limit` seconds), else its last value."""
    deadline = time.monotonic() + limit
    while not (value := fn()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def test_service_counts_a_stream_when_it_ends(start_server, recording):
    """A streamed request was counted as 200 when its first byte went out; it is counted when it ends."""
    url = start_server("--step-delay-ms", "300")
    while_running = []

    def look():
        _wait_until_running(url)
        while_running.append(_requests_counted(url))

    results = _concurrently(url, [{"prompt_ids": PROMPT, "max_new_tokens": 3, "stream": True}], after_first=look)
    assert while_running == [{}]  # running, its 200 status line on the wire, not yet counted
    code, body = results[0]
    assert code == 200 and json.loads(body.splitlines()[-1]) == {"tokens": recording[1][:3], "finish_reason": "length"}
    assert _requests_counted(url) == {"200": 1}


def test_service_counts_a_stream_cut_by_its_client_as_499(start_server):
    url = start_server("--step-delay-ms", "200")
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"prompt_ids": PROMPT, "max_new_tokens": 7, "stream": True}).encode()
    head = _raw(port, b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\n\r\n" + body, until_eof=False)  # the status line, then gone
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert _poll(lambda: _requests_counted(url)) == {"499": 1}
    assert _poll(lambda: "adafuse_active_sequences 0\n" in _get(url, "/metrics"))  # cancelled at its next token
    assert _requests_counted(url) == {"499": 1}


def _get_status(url: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url + path, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.parametrize("stream", [False, True])
def test_service_is_not_ready_after_a_sticky_device_error(start_server, recording, stream):
    """/health said ok after a sticky CUDA error (every later call fails): it answers 503 with the
    reason, generate answers 503 instead of queueing, and the failed request is counted as 500."""
    url = start_server("--sticky-error-at-decode", "2")
    assert _get_status(url, "/health")[0] == 200
    reason = "decode step: an illegal memory access was encountered (sticky error simulated by the replay backend)"
    code, body = _post(url, {"prompt_ids": PROMPT, "max_new_tokens": 4, "stream": stream})
    if stream:  # the status line went out with the first token; the last line says what happened
        lines = [json.loads(line) for line in body.splitlines()]
        assert code == 200 and [line["token"] for line in lines[:-1]] == recording[1][:2] and lines[-1] == {"error": reason}
    else:
        assert (code, json.loads(body)) == (500, {"error": reason})
    code, body = _get_status(url, "/health")
    assert (code, json.loads(body)) == (503, {"status": "unavailable", "error": reason}) and body.count("\n") == 0
    code, body = _post(url, {"prompt_ids": PROMPT, "max_new_tokens": 1})
    assert (code, json.loads(body)) == (503, {"error": f"the engine cannot run after a device error ({reason}); restart the service"})
    assert _requests_counted(url) == {"500": 1, "503": 1}


def test_generate_cli_reports_one_line(runtime_build, converted):
    exe = runtime_build / "adafuse-generate"
    proc = subprocess.run([exe, "--engine", converted[1], "--prompt-ids", "1,2,3"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr == (f"adafuse-generate: {converted[1]}: built with tensorrt-rtx 1.7.1.116; this runtime runs full "
                           "TensorRT engines (convert with --backend tensorrt)\n")
    proc = subprocess.run([exe, "--engine", converted[1], "--prompt-ids", "1,x"], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (2, "adafuse-generate: --prompt-ids: expected comma-separated non-negative token ids, found '1,x'\n")


# ---- the ctypes binding against the header (what only a TensorRT machine would otherwise exercise) ----

_C_VALUES = {"int": "c_int", "int32_t": "c_int", "int64_t": "c_long", "uint64_t": "c_ulong", "size_t": "c_ulong",
             "float": "c_float", "adafuse_status": "c_int"}


def _ctypes_name(t) -> str:
    return "None" if t is None else getattr(t, "__name__", str(t))


def _header_declarations() -> tuple[dict[str, tuple[str, list[str]]], dict[str, list[str]]]:
    """(functions: name -> (return type, argument types), structs: name -> field types) from runtime.h."""
    text = re.sub(r"/\*.*?\*/", "", (RUNTIME / "include/adafuse/runtime.h").read_text(), flags=re.S)
    functions = {}
    for ret, name, args in re.findall(r"ADAFUSE_API\s+([\w\s\*]+?)\s*\b(adafuse_\w+)\(([^)]*)\);", text):
        types = [] if args.strip() == "void" else [re.sub(r"\s*\b\w+$", "", a.strip()) for a in args.split(",")]
        functions[name] = (ret.strip(), types)
    structs = {name: [re.sub(r"\s*\b\w+;$", "", f.strip()) for f in body.strip().split("\n") if f.strip()]
               for body, name in re.findall(r"typedef struct \w+ \{([^}]*)\}\s*(\w+);", text)}
    return functions, structs


def _matches(c_type: str, py_type) -> bool:
    c_type = c_type.replace("const ", "").strip()
    if c_type.endswith("*"):  # pointers: void*, char*, or a pointer to the matching scalar/struct
        return py_type in (ctypes.c_void_p, ctypes.c_char_p) or _ctypes_name(py_type).startswith("LP_")
    if c_type == "void":
        return py_type is None
    if c_type in ("adafuse_sampling", "adafuse_open_options", "adafuse_generate_options"):
        return False  # passed by value: not used through ctypes
    return _ctypes_name(py_type) == _C_VALUES.get(c_type, c_type)


def test_ctypes_signatures_match_the_header():
    from adafuse_export.runners import cpp_runtime

    functions, structs = _header_declarations()
    assert len(functions) >= 25, sorted(functions)
    for name, (restype, argtypes) in cpp_runtime._SIGNATURES.items():
        assert name in functions, f"{name} is not in runtime.h"
        c_ret, c_args = functions[name]
        assert _matches(c_ret, restype), (name, c_ret, restype)
        assert len(c_args) == len(argtypes), (name, c_args, argtypes)
        for c_arg, py_arg in zip(c_args, argtypes):
            assert _matches(c_arg, py_arg), (name, c_arg, py_arg)
    for struct, cls in (("adafuse_sampling", cpp_runtime._Sampling), ("adafuse_open_options", cpp_runtime._OpenOptions),
                        ("adafuse_step_row", cpp_runtime._StepRow)):
        fields = structs[struct]
        assert len(fields) == len(cls._fields_), (struct, fields)
        for c_field, (_, py_field) in zip(fields, cls._fields_):
            assert _matches(c_field, py_field), (struct, c_field, py_field)


def test_validate_runtime_cpp_reaches_the_cpp_runtime(runtime_lib, converted):
    """`validate --runtime cpp` drives the engine through the C API: here it gets as far as the
    runtime's own refusal of a TensorRT-RTX engine, one line, exit 2; an ONNX export is refused."""
    ckpt, engine = converted
    env = dict(os.environ, PYTHONPATH=str(REPO), ADAFUSE_RUNTIME_LIB=runtime_lib)
    proc = subprocess.run([sys.executable, "-m", "adafuse_export", "validate", str(ckpt), str(engine), "--runtime", "cpp"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "built with tensorrt-rtx 1.7.1.116; this runtime runs full" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "adafuse_export", "validate", str(ckpt), str(engine.with_suffix(".onnx")),
                           "--runtime", "cpp"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "--runtime cpp" in proc.stderr and "runs .engine files" in proc.stderr, proc.stderr


# ---- issue 24, classes 1 and 2: hostile files, garbage handles, hostile clients -------------------------

def _bounded(fn, limit: float = 20.0):
    """fn() on a daemon thread: (result or exception); a call that blocks past `limit` fails the test."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit)
    assert not t.is_alive(), f"blocked for {limit} s"
    return box


def _hostile_manifests(root: Path) -> list[tuple[str, object]]:
    """(case name, edit): every edit turns a copy of the converted engine folder into a hostile one."""
    def files(entry):
        return lambda e, m: m.__setitem__("files", entry)

    def link_listed(target):
        def edit(e, m):
            (e.parent / "listed").symlink_to(target)
            m["files"] = {"listed": "0" * 64}
        return edit

    def fifo_listed(e, m):
        os.mkfifo(e.parent / "pipe")
        m["files"] = {"pipe": "0" * 64}

    def manifest_is(kind):
        def edit(e, m):
            mf = e.with_suffix(".json")
            mf.unlink()
            if kind == "fifo":
                os.mkfifo(mf)
            elif kind == "dev-zero":
                mf.symlink_to("/dev/zero")
            elif kind == "directory":
                mf.mkdir()
            elif kind == "deep":
                mf.write_text("[" * 33 + "]" * 33)
            elif kind == "very deep":
                mf.write_text("[" * 200_000)
            return True  # the manifest is written here
        return edit

    def field(key, value):
        return lambda e, m: m.__setitem__(key, value)

    secret = root / "secret.txt"
    secret.write_text("secret")
    return [
        ("files ../secret.txt", files({"../secret.txt": "0" * 64})),
        ("files absolute", files({str(secret): "0" * 64})),
        ("files /etc/passwd", files({"/etc/passwd": "0" * 64})),
        ("files a/../../x", files({"out.onnx/../../secret.txt": "0" * 64})),
        ("files ..", files({"..": "0" * 64})),
        ("files empty name", files({"": "0" * 64})),
        ("files not strings", files({"out.onnx/decoder.onnx": 5})),
        ("files a list", files(["out.onnx/decoder.onnx"])),
        ("files null", files(None)),
        ("files link outside", link_listed(secret)),
        ("files link to /dev/zero", link_listed("/dev/zero")),
        ("files FIFO", fifo_listed),
        ("files directory", lambda e, m: [(e.parent / "d").mkdir(), m.__setitem__("files", {"d": "0" * 64})] and None),
        ("manifest FIFO", manifest_is("fifo")),
        ("manifest /dev/zero", manifest_is("dev-zero")),
        ("manifest directory", manifest_is("directory")),
        ("manifest 33 deep", manifest_is("deep")),
        ("manifest 200000 deep", manifest_is("very deep")),
        ("engine not an object", field("engine", [1])),
        ("plugin not an object", field("plugin", "AdafuseLoraLinear")),
        ("plugin unknown op", field("plugin", {"name": "Evil", "version": "1"})),
        ("engine.max_seq a string", lambda e, m: m["engine"].__setitem__("max_seq", "32")),
        ("files one file twice", lambda e, m: m.__setitem__("files", {**m["files"], **{
            k.replace("/", "/./", 1): v for k, v in m["files"].items()}})),
    ]


def test_hostile_manifests_are_refused_as_python_refuses_them(runtime_lib, converted, tmp_path):
    """Class 1: every generated hostile manifest is refused by the C API with Python's verify_engine
    message, word for word, without blocking (FIFOs) or reading a device."""
    from adafuse_export.runners.cpp_runtime import verify_manifest
    from adafuse_export.trt.manifest import verify_engine

    cases = _hostile_manifests(tmp_path)
    for i, (name, edit) in enumerate(cases):
        engine = _break_engine(converted[1], tmp_path / f"e{i}", "none")
        manifest = json.loads(engine.with_suffix(".json").read_text())
        if not edit(engine, manifest):
            engine.with_suffix(".json").write_text(json.dumps(manifest))
        python = _bounded(lambda: verify_engine(engine))
        cpp = _bounded(lambda: verify_manifest(engine))
        assert isinstance(python.get("error"), AdafuseError), (name, python)
        assert isinstance(cpp.get("error"), AdafuseError), (name, cpp)
        assert str(cpp["error"]) == str(python["error"]), name
        assert "\n" not in str(cpp["error"]), name
    assert len(cases) == 23


def _routes_file(path: Path, header: dict | str, data: bytes = b"") -> Path:
    import struct

    text = header if isinstance(header, str) else json.dumps(header)
    path.write_bytes(struct.pack("<Q", len(text)) + text.encode() + data)
    return path


def _hostile_routes(tmp_path: Path) -> list[tuple[Path, str]]:
    """(file, a part of the expected one-line refusal)."""
    def t(dtype, shape, offsets):
        return {"dtype": dtype, "shape": shape, "data_offsets": offsets}

    good_gates = t("F32", [2, 2], [16, 32])
    cases = [
        # the file: 4 * 2^40 * 2^24 bytes wrap to 0 in 64 bits
        ({"expert_ids": t("I32", [2**40, 2**24], [0, 0]), "gates": t("F32", [2**40, 2**24], [0, 0])}, b"", "shape must be"),
        ({"expert_ids": t("I32", [2**20] * 4, [0, 0]), "gates": good_gates}, b"\0" * 32, "shape must be"),
        ({"expert_ids": t("I32", [4096] * 6, [0, 0]), "gates": good_gates}, b"\0" * 4096, "has more bytes than 64 bits count"),
        ({"expert_ids": t("I32", [2, 2], [0, 2**64 - 1]), "gates": good_gates}, b"\0" * 32, "lie outside"),
        ({"expert_ids": t("I32", [2, 2], [-16, 0]), "gates": good_gates}, b"\0" * 32, "lie outside"),
        ({"expert_ids": t("I32", [2, 2], [0, 16]), "gates": t("F32", [2, 2], [8, 24])}, b"\0" * 32, "overlap"),
        ({"expert_ids": t("I32", [2, 2], [0, 16])}, b"\0" * 16, "tensor 'gates' not found"),
        ({"gates": good_gates}, b"\0" * 32, "tensor 'expert_ids' not found"),
        ({"expert_ids": t("I32", [2, 2], [0, 16]), "gates": t("F32", [2, 3], [16, 40])}, b"\0" * 40, "must have one equal"),
        ({"expert_ids": t("I64", [2, 2], [0, 32]), "gates": t("F32", [2, 2], [32, 48])}, b"\0" * 48, "expected I32 of rank 2"),
        ({"expert_ids": t("I32", [1] * 9, [0, 4]), "gates": good_gates}, b"\0" * 32, "at most 8"),
        ("[" * 100_000, b"", "nested deeper than 32 levels"),
        ('{"expert_ids": 1e309}', b"", "corrupt safetensors header"),
    ]
    out = []
    for i, (header, data, part) in enumerate(cases):
        out.append((_routes_file(tmp_path / f"r{i}.safetensors", header, data), part))
    neg = np.array([[0, 1], [-3, 1]], np.int32).tobytes() + np.zeros(4, np.float32).tobytes()
    out.append((_routes_file(tmp_path / "neg.safetensors", {"expert_ids": t("I32", [2, 2], [0, 16]), "gates": good_gates}, neg),
                "expert_ids holds -3, expected ids >= 0"))
    os.mkfifo(tmp_path / "fifo.safetensors")
    out.append((tmp_path / "fifo.safetensors", "expected a safetensors file, found a FIFO (named pipe)"))
    out.append((Path("/dev/zero"), "expected a safetensors file, found a character device"))
    (tmp_path / "huge-length.safetensors").write_bytes((2**63).to_bytes(8, "little") + b"{}")
    out.append((tmp_path / "huge-length.safetensors", "header length 9223372036854775808 is larger than the 2 bytes after it"))
    return out


def test_hostile_routing_tables_are_refused_in_one_line(runtime_lib, tmp_path):
    """Class 1 (and the tracebacks class): overflowing shapes, offsets, missing tensors, negative ids,
    FIFOs and devices: one line naming the file, never a crash on the first lookup."""
    from adafuse_export.runners.cpp_runtime import RoutingTable

    cases = _hostile_routes(tmp_path)
    for path, part in cases:
        got = _bounded(lambda: RoutingTable(path))
        err = got.get("error")
        assert isinstance(err, AdafuseError), (path, part, got)
        assert str(err).startswith(f"{path}: ") and part in str(err) and "\n" not in str(err), (path, str(err))
    assert len(cases) == 17


def test_garbage_handles_are_refused_by_the_c_api(runtime_lib):
    """Class 2: pointers the library never handed out (or freed) give ADAFUSE_ERR_INVALID_ARGUMENT."""
    from adafuse_export.runners.cpp_runtime import load_library

    lib = load_library()
    buf = ctypes.create_string_buffer(4096)
    sampler = ctypes.c_void_p()
    from adafuse_export.runners.cpp_runtime import _Sampling
    assert lib.adafuse_sampler_create(ctypes.byref(_Sampling(0.0, 0, 1.0, 0)), ctypes.byref(sampler)) == 0
    lib.adafuse_sampler_free(sampler)
    garbage = [0xdeadbeef, 8, ctypes.addressof(buf), sampler.value, 2**64 - 16, 0x7fffffff0000]
    ids = np.zeros(1, np.int64)
    out = np.zeros(64, np.float32)
    eids = np.zeros(64, np.int32)
    token = ctypes.c_int64()
    count = 0
    for g in garbage:
        h = ctypes.c_void_p(g)
        for status in (lib.adafuse_routes_lookup(h, ids.ctypes.data, 1, eids.ctypes.data, out.ctypes.data),
                       lib.adafuse_sampler_next(h, out.ctypes.data, 8, ctypes.byref(token)),
                       lib.adafuse_prefill(h, ids.ctypes.data, 1, 1, out.ctypes.data, None, None),
                       lib.adafuse_decode(h, ids.ctypes.data, 1, out.ctypes.data, None, None),
                       lib.adafuse_read_kv(h, 0, 0, out.ctypes.data)):
            assert status == 1, (hex(g), status)
            assert "not a live handle" in lib.adafuse_last_error().decode()
            count += 1
        assert lib.adafuse_past_length(h) == 0
        assert lib.adafuse_manifest_json(h) == b""
        for free in (lib.adafuse_routes_free, lib.adafuse_sampler_free, lib.adafuse_engine_free, lib.adafuse_manifest_free):
            free(h)  # ignored
    assert count == 30


def test_an_unrelated_runtime_library_is_one_line(runtime_build, tmp_path, monkeypatch):
    from adafuse_export.runners import cpp_runtime

    for lib in (runtime_build / "tests/libplugin_library_stub.so", "libm.so.6"):
        monkeypatch.setenv("ADAFUSE_RUNTIME_LIB", str(lib))
        with pytest.raises(AdafuseError, match=rf"^{lib}: not the adafuse C\+\+ runtime \(it has no 'adafuse_\w+' entry point\)"):
            cpp_runtime.verify_manifest(tmp_path / "out.engine")
    (tmp_path / "notalib.so").write_text("hello")
    monkeypatch.setenv("ADAFUSE_RUNTIME_LIB", str(tmp_path / "notalib.so"))
    with pytest.raises(AdafuseError, match="cannot load the C\\+\\+ runtime"):
        cpp_runtime.verify_manifest(tmp_path / "out.engine")


def test_cli_paths_do_not_hang_on_a_fifo_manifest(runtime_build, runtime_lib, converted, tmp_path):
    """adafuse-generate, adafuse-serve and validate --runtime cpp on an engine whose manifest is a FIFO."""
    engine = _break_engine(converted[1], tmp_path / "e", "none")
    engine.with_suffix(".json").unlink()
    os.mkfifo(engine.with_suffix(".json"))
    want = f"{engine.with_suffix('.json')}: expected a JSON file, found a FIFO (named pipe)"
    for exe, args in (("adafuse-generate", ["--prompt-ids", "1"]), ("adafuse-serve", ["--port", "0"])):
        proc = subprocess.run([runtime_build / exe, "--engine", engine, *args], capture_output=True, text=True, timeout=30)
        assert (proc.returncode, proc.stderr) == (2, f"{exe}: {want}\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), ADAFUSE_RUNTIME_LIB=runtime_lib)
    proc = subprocess.run([sys.executable, "-m", "adafuse_export", "validate", str(converted[0]), str(engine), "--runtime", "cpp"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and want in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr


def _raw(port: int, data: bytes, timeout: float = 10, until_eof: bool = True) -> bytes:
    """The bytes answered to `data` on a fresh connection: all of them up to EOF, or the first ones."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
            if not until_eof:
                break
        return out


def _deep_bodies() -> list[bytes]:
    bodies = []
    for depth in (17, 100, 10_000, 200_000):
        objects = min(depth, 150_000)  # 6 bytes a level: 900 KB, under the 1 MiB body limit
        bodies += [b"[" * depth + b"]" * depth, b"[" * depth, b'{"a":' * objects + b"1" + b"}" * objects,
                   b'{"prompt_ids": ' + b"[" * depth + b"]" * depth + b"}"]
    return bodies


def test_service_refuses_deep_nesting_and_unbounded_bodies(start_server):
    """Class 2: nested bodies (up to 200,000 deep, 400 KB, under the 1 MiB limit) are 400s; chunked
    and compressed bodies are refused before they are read; the service keeps answering."""
    url = start_server()
    port = int(url.rsplit(":", 1)[1])
    bodies = _deep_bodies()
    for body in bodies:
        code, text = _post(url, body)
        assert code == 400 and json.loads(text) == {"error": "JSON nested deeper than 16 levels"}, (len(body), text)
    head = b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    chunked = _raw(port, head + b"Transfer-Encoding: chunked\r\n\r\n" + b"100000\r\n" + b"[" * 4096)
    assert chunked.startswith(b"HTTP/1.1 411 "), chunked[:200]
    gz = _raw(port, head + b"Content-Encoding: gzip\r\nContent-Length: 4\r\n\r\nabcd")
    assert gz.startswith(b"HTTP/1.1 415 "), gz[:200]
    big = _raw(port, head + b"Content-Length: 2000000\r\n\r\n")  # answered and closed before any body byte
    assert big.startswith(b"HTTP/1.1 413 "), big[:200]
    assert json.loads(_get(url, "/health"))["status"] == "ok"
    assert len(bodies) == 16


def test_service_health_is_answered_under_idle_and_slow_clients(start_server):
    """Class 2: 300 idle connections and 16 clients sending a header line every 2 s leave /health
    answered at once; a slow client is cut at the request deadline, an idle one at the idle timeout."""
    import socket

    url = start_server("--idle-timeout-ms", "30000", "--request-timeout-ms", "3000")
    port = int(url.rsplit(":", 1)[1])
    socks = []
    try:
        socks += [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(300)]
        slow = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(16)]
        socks += slow
        for s in slow:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        delays = []
        t0 = time.monotonic()
        for _ in range(3):  # 4+ s: the slow clients pass the 3 s request deadline
            for s in slow:
                try:
                    s.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    pass
            start = time.monotonic()
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                assert json.loads(r.read())["status"] == "ok"
            delays.append(time.monotonic() - start)
            time.sleep(2)
        assert max(delays) < 2.0, delays
        # Every slow client was cut by its request deadline (3 s) rather than served forever.
        for s in slow:  # (httplib answers the cut request with 400, then the connection closes)
            s.settimeout(max(0.1, 10 - (time.monotonic() - t0)))
            try:
                while s.recv(4096):
                    pass
            except ConnectionResetError:
                pass
        code, text = _post(url, {"prompt_ids": PROMPT, "max_new_tokens": 2})
        assert code == 200, text
    finally:
        for s in socks:
            s.close()


def test_service_caps_its_connections(start_server):
    import socket

    url = start_server("--max-connections", "4", "--idle-timeout-ms", "20000")
    port = int(url.rsplit(":", 1)[1])
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(4)]
    try:
        time.sleep(0.3)
        over = _raw(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert over.startswith(b"HTTP/1.1 503 ") and b"too many connections" in over, over
    finally:
        for s in held:
            s.close()
    for _ in range(50):  # the held connections' threads end when their sockets close
        try:
            if json.loads(_get(url, "/health"))["status"] == "ok":
                break
        except (urllib.error.HTTPError, urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    else:
        raise AssertionError("/health never answered after the held connections closed")
