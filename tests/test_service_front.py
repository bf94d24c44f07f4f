"""The HTTP front of adafuse-serve under real traffic (issue 21), driven with a real HTTP client over
real sockets against the test server (runtime/tests/replay_server_main.cpp) in its --history mode:
HistoryBackendForTests, whose logits are a pure function of a sequence's whole history, reimplemented
here in Python (splitmix64) as the independent reference. --equal-length 1 runs the same backend
through the equal-length executor instead of the in-flight one.

Covers: cancellation when the client goes away (streaming or not, running or queued, both executors;
the slot freed), the metrics (TTFT, inter-token latency, tokens/s, cancelled, outcomes), the
OpenAI-style /v1/completions (+ SSE) and /v1/models, /health/live, 503 with Retry-After.
"""
from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from http_servers import Servers

VOCAB = 40
PROMPT = [5, 6, 7]
M64 = 2**64 - 1


# ---- the reference: HistoryBackendForTests in Python ---------------------------------------------

def _splitmix64(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & M64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return state, z ^ (z >> 31)


def _extend(h: int, token: int) -> int:
    return _splitmix64(h ^ ((token * 0xD6E8FEB86659FD93) & M64))[1]


def _logits(h: int) -> np.ndarray:
    out = np.empty(VOCAB, dtype=np.float32)
    state = h
    for t in range(VOCAB):
        state, z = _splitmix64(state)
        out[t] = np.float32((z >> 11) * 2.0**-53 * 8.0 - 4.0)
    return out


def greedy_reference(prompt: list[int], max_new: int, stop: tuple[int, ...] = ()) -> list[int]:
    h = 0x6A09E667F3BCC908
    for t in prompt:
        h = _extend(h, t)
    out: list[int] = []
    while len(out) < max_new:
        token = int(np.argmax(_logits(h)))
        out.append(token)
        if token in stop:
            break
        h = _extend(h, token)
    return out


def test_the_python_reference_is_not_trivial():
    a, b = greedy_reference(PROMPT, 12), greedy_reference([5, 6, 8], 12)
    assert a != b and len(set(a)) > 3


# ---- the server ------------------------------------------------------------------------------------

@pytest.fixture
def server_binary(request) -> Path:
    """The test server: $ADAFUSE_TEST_SERVER (runtime/tools/sanitize.sh service: a ThreadSanitizer build), else
    the project's native build's."""
    given = os.environ.get("ADAFUSE_TEST_SERVER")
    return Path(given) if given else request.getfixturevalue("native_build") / "runtime/tests/adafuse_replay_server_for_tests"


@pytest.fixture
def server(server_binary):
    with Servers() as servers:
        yield lambda *options: servers.start([server_binary, "--history", str(VOCAB), "--host", "127.0.0.1", "--port", "0",
                                              *options])


def _request(url: str, path: str, body=None, timeout: float = 30) -> tuple[int, dict[str, str], str]:
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def _metrics(url: str) -> str:
    return _request(url, "/metrics")[2]


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


def _requests_counted(url: str) -> dict[str, float]:
    return {m[0]: float(m[1]) for m in re.findall(r'^adafuse_requests_total\{code="(\d+)"\} (\S+)$', _metrics(url), re.M)}


def _poll(fn, limit: float = 10.0):
    deadline = time.monotonic() + limit
    while not (value := fn()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _send(port: int, path: str, body: dict) -> socket.socket:
    """A request sent on a raw connection, nothing read: the caller closes it to go away."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
              + data)
    return s


# ---- cancellation on client disconnect -------------------------------------------------------------

@pytest.mark.parametrize("executor", ["in-flight", "equal-length"])
@pytest.mark.parametrize("path,stream", [("/v1/generate", False), ("/v1/generate", True), ("/v1/completions", False),
                                         ("/v1/completions", True)])
def test_a_request_whose_client_goes_away_stops_within_a_step(server, executor, path, stream):
    """60 tokens at 100 ms a step; the client leaves after 3: generation stops within a step of that,
    it is counted cancelled and 499, and the one slot (max_batch 1) serves the next request at once,
    with the reference's tokens (the slot's history was reset)."""
    url = server("--max-batch", "1", "--step-delay-ms", "100", "--equal-length", "1" if executor == "equal-length" else "0")
    body = ({"prompt_ids": PROMPT, "max_new_tokens": 60} if path == "/v1/generate"
            else {"prompt": PROMPT, "max_tokens": 60, "temperature": 0}) | {"stream": stream}
    client = _send(_port(url), path, body)
    assert _poll(lambda: _metric(_metrics(url), "adafuse_tokens_generated_total") >= 3)
    client.close()
    closed_at = time.monotonic()
    at_close = _metric(_metrics(url), "adafuse_tokens_generated_total")
    assert _poll(lambda: _metric(_metrics(url), "adafuse_requests_cancelled_total") == 1)
    stopped_after = time.monotonic() - closed_at
    text = _metrics(url)
    # The step running when the client left may still deliver its token; then nothing more.
    assert _metric(text, "adafuse_tokens_generated_total") <= at_close + 2, (at_close, text)
    assert stopped_after < 1.5, stopped_after  # vs 5.7 s for the remaining 57 steps
    assert _poll(lambda: "adafuse_active_sequences 0\n" in _metrics(url))
    assert _poll(lambda: _requests_counted(url) == {"499": 1}), _requests_counted(url)
    started = time.monotonic()
    code, _, answer = _request(url, "/v1/generate", {"prompt_ids": PROMPT, "max_new_tokens": 4})
    assert (code, json.loads(answer)) == (200, {"tokens": greedy_reference(PROMPT, 4), "finish_reason": "length"})
    assert time.monotonic() - started < 3.0
    time.sleep(0.3)  # nothing else runs afterwards: the cancelled request's tokens stay where they stopped
    assert _metric(_metrics(url), "adafuse_tokens_generated_total") <= at_close + 2 + 4


@pytest.mark.parametrize("executor", ["in-flight", "equal-length"])
def test_a_queued_request_whose_client_goes_away_never_runs(server, executor):
    url = server("--max-batch", "1", "--step-delay-ms", "50", "--equal-length", "1" if executor == "equal-length" else "0")
    running = _send(_port(url), "/v1/generate", {"prompt_ids": PROMPT, "max_new_tokens": 12})
    assert _poll(lambda: _metric(_metrics(url), "adafuse_tokens_generated_total") >= 1)
    queued = _send(_port(url), "/v1/generate", {"prompt_ids": [1, 2], "max_new_tokens": 30})
    assert _poll(lambda: _metric(_metrics(url), "adafuse_queue_depth") == 1)
    queued.close()
    reply = b""
    while chunk := running.recv(65536):  # the running one finishes and is answered
        reply += chunk
        if reply.endswith(b"\n") and b"finish_reason" in reply:
            break
    running.close()
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["tokens"] == greedy_reference(PROMPT, 12)
    assert _poll(lambda: _metric(_metrics(url), "adafuse_requests_cancelled_total") == 1)
    time.sleep(0.3)
    text = _metrics(url)
    assert _metric(text, "adafuse_tokens_generated_total") == 12  # the queued one generated nothing
    assert _requests_counted(url) == {"200": 1, "499": 1}


# ---- metrics ----------------------------------------------------------------------------------------

def test_metrics_time_every_token_and_count_outcomes_when_they_end(server):
    url = server("--max-batch", "2", "--step-delay-ms", "50")
    for _ in range(2):
        code, _, _ = _request(url, "/v1/generate", {"prompt_ids": PROMPT, "max_new_tokens": 4})
        assert code == 200
    assert _request(url, "/v1/completions", {"prompt": [99]})[0] == 400
    text = _metrics(url)
    assert _metric(text, "adafuse_time_to_first_token_seconds_count") == 2
    assert _metric(text, "adafuse_inter_token_latency_seconds_count") == 6  # 3 gaps per request
    # Every token waited for one 50 ms step at least (and much less than a second on this machine).
    assert 2 * 0.045 <= _metric(text, "adafuse_time_to_first_token_seconds_sum") < 2 * 2.0
    assert 6 * 0.045 <= _metric(text, "adafuse_inter_token_latency_seconds_sum") < 6 * 2.0
    assert _metric(text, 'adafuse_inter_token_latency_seconds_bucket{le="0.025"}') == 0
    assert _metric(text, 'adafuse_inter_token_latency_seconds_bucket{le="+Inf"}') == 6
    assert _metric(text, "adafuse_queue_wait_seconds_count") == 2
    assert _metric(text, "adafuse_batch_rows_count") == 8  # one row per step, 4 steps per request
    assert _metric(text, "adafuse_tokens_generated_total") == 8
    assert 0 < _metric(text, "adafuse_tokens_per_second") <= 8 / 0.4  # 8 tokens took 8 steps of >= 50 ms
    assert _metric(text, "adafuse_requests_cancelled_total") == 0
    assert _requests_counted(url) == {"200": 2, "400": 1}
    assert "# TYPE adafuse_time_to_first_token_seconds histogram" in text


# ---- /v1/completions and /v1/models -----------------------------------------------------------------

def test_completions_greedy_equals_the_reference(server):
    url = server("--model-name", "moe-7b")
    ref = greedy_reference(PROMPT, 6)
    code, headers, text = _request(url, "/v1/completions", {"model": "moe-7b", "prompt": PROMPT, "max_tokens": 6, "temperature": 0})
    assert code == 200 and headers["Content-Type"] == "application/json", text
    body = json.loads(text)
    assert body["object"] == "text_completion" and body["model"] == "moe-7b" and body["id"].startswith("cmpl-")
    assert abs(body["created"] - time.time()) < 60
    assert body["choices"] == [{"index": 0, "text": "", "token_ids": ref, "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    # [[ids]] is the same one prompt; a stop token id ends it with "stop", the stop id included
    code, _, text = _request(url, "/v1/completions", {"prompt": [PROMPT], "max_tokens": 6, "temperature": 0,
                                                      "stop_token_ids": [ref[2]]})
    choice = json.loads(text)["choices"][0]
    assert (code, choice["token_ids"], choice["finish_reason"]) == (200, ref[:ref.index(ref[2]) + 1], "stop")
    # /v1/generate agrees
    assert json.loads(_request(url, "/v1/generate", {"prompt_ids": PROMPT, "max_new_tokens": 6})[2])["tokens"] == ref


def test_completions_stream_server_sent_events(server):
    url = server("--step-delay-ms", "10")
    ref = greedy_reference(PROMPT, 5)
    code, headers, text = _request(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True,
                                                            "stream_options": {"include_usage": True}})
    assert code == 200 and headers["Content-Type"] == "text/event-stream"
    assert text.endswith("data: [DONE]\n\n")
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events)
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "text_completion" for c in chunks)
    tokens = [c["choices"][0]["token_ids"] for c in chunks[:5]]
    assert tokens == [[t] for t in ref] and all(c["choices"][0]["finish_reason"] is None for c in chunks[:5])
    assert chunks[5]["choices"] == [{"index": 0, "text": "", "token_ids": [], "logprobs": None, "finish_reason": "length"}]
    assert chunks[6]["choices"] == [] and chunks[6]["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert len(chunks) == 7
    # without include_usage: no usage chunk
    text = _request(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "stream": True})[2]
    assert text.count("data: ") == 4 and "usage" not in text
    assert _requests_counted(url) == {"200": 2}


def test_completions_sample_per_seed(server):
    url = server()
    ask = {"prompt": PROMPT, "max_tokens": 10, "temperature": 1.5, "top_k": 20, "top_p": 0.95}
    got = [json.loads(_request(url, "/v1/completions", ask | extra)[2])["choices"][0]["token_ids"]
           for extra in ({"seed": 1}, {"seed": 1}, {"seed": 2}, {}, {})]
    assert got[0] == got[1] and got[0] != got[2]
    assert got[3] != got[4]  # no seed: a fresh one per request, as OpenAI samples
    assert got[0] != greedy_reference(PROMPT, 10)
    # temperature defaults to 1 (OpenAI's); top_k -1 is vLLM's "off"
    assert _request(url, "/v1/completions", {"prompt": PROMPT, "top_k": -1, "seed": 3})[0] == 200


def test_models_lists_the_one_model(server):
    url = server("--model-name", "moe-7b")
    code, _, text = _request(url, "/v1/models")
    body = json.loads(text)
    assert code == 200 and body["object"] == "list" and len(body["data"]) == 1
    assert body["data"][0]["id"] == "moe-7b" and body["data"][0]["object"] == "model"
    code, _, text = _request(url, "/v1/completions", {"model": "gpt-4", "prompt": PROMPT})
    assert code == 404 and json.loads(text)["error"] == {
        "message": 'the model "gpt-4" does not exist; this service serves "moe-7b"', "type": "not_found_error", "param": None,
        "code": "model_not_found"}
    assert json.loads(_request(server(), "/v1/models")[2])["data"][0]["id"] == "history"  # the default name


@pytest.mark.parametrize("body,reason", [
    (b'{"prompt": [1, 2', "malformed JSON at byte 17"),
    (b"[1, 2]", "expected a JSON object, found array"),
    (b"[" * 40 + b"]" * 40, "JSON nested deeper than 16 levels"),
    ({"max_tokens": 2}, "'prompt' is required (a list of token ids)"),
    ({"prompt": "Hello"}, "'prompt' is text: this service has no tokenizer; send token ids (a list of integers)"),
    ({"prompt": ["Hello", "you"]}, "'prompt' is text: this service has no tokenizer; send token ids (a list of integers)"),
    ({"prompt": [[1], [2]]}, "'prompt' holds 2 prompts; send one per request"),
    ({"prompt": [1, 1.5]}, "'prompt' must hold integer token ids, found 1.5"),
    ({"prompt": []}, "prompt is empty"),
    ({"prompt": [1, 40]}, "prompt[1] = 40 is out of the vocabulary [0, 40)"),
    ({"prompt": [2**64 - 1]}, "prompt[0] = 18446744073709551615 is not a token id (ids lie below 2^63)"),
    ({"prompt": PROMPT, "max_tokens": 0}, "'max_tokens' must be an integer in [1, 2147483647], found 0"),
    ({"prompt": PROMPT, "max_tokens": 1023}, "prompt of 3 tokens + max_tokens 1023 exceed the engine's profile (max_seq 1024)"),
    ({"prompt": PROMPT, "temperature": "hot"}, "'temperature' must be a number, found \"hot\""),
    ({"prompt": PROMPT, "top_p": 0}, "sampling top_p must be in (0, 1] (1: off), found 0.000000"),
    ({"prompt": PROMPT, "stop": ["\n"]}, "'stop' holds text: this service has no tokenizer; use 'stop_token_ids', found [\"\\n\"]"),
    ({"prompt": PROMPT, "stop_token_ids": [41]}, "stop id 41 is out of the vocabulary [0, 40)"),
    ({"prompt": PROMPT, "n": 2}, "'n' must be 1 (one choice per request), found 2"),
    ({"prompt": PROMPT, "logprobs": 1}, "'logprobs' is not supported (no log-probabilities are returned), found 1"),
    ({"prompt": PROMPT, "echo": True}, "'echo' must be false, found true"),
    ({"prompt": PROMPT, "stream": "yes"}, "'stream' must be true or false, found \"yes\""),
    ({"prompt": PROMPT, "stream_options": {"include_usage": True}}, "'stream_options' is only allowed with \"stream\": true"),
    ({"prompt": PROMPT, "stream": True, "stream_options": {"x": 1}}, "unknown field 'x'"),
    ({"prompt": PROMPT, "prompt_ids": PROMPT}, "unknown field 'prompt_ids'"),
    ({"prompt": PROMPT, "model": 7}, "'model' must be a string, found 7"),
])
def test_completions_refuse_bad_bodies_in_one_line(server, body, reason):
    url = server()
    code, _, text = _request(url, "/v1/completions", body)
    assert code == 400, text
    assert text.count("\n") == 1 and json.loads(text) == {
        "error": {"message": reason, "type": "invalid_request_error", "param": None, "code": None}}


def test_completions_accept_openai_fields_at_their_neutral_values(server):
    url = server()
    code, _, text = _request(url, "/v1/completions", {
        "prompt": PROMPT, "max_tokens": 2, "temperature": 0, "n": 1, "best_of": 1, "echo": False, "logprobs": None,
        "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "stop": None, "suffix": None, "user": "u1",
        "seed": None})
    assert code == 200 and json.loads(text)["choices"][0]["token_ids"] == greedy_reference(PROMPT, 2), text


# ---- behind a load balancer -------------------------------------------------------------------------

def test_liveness_and_a_full_queue_answer_for_a_load_balancer(server):
    url = server("--max-batch", "1", "--queue", "1", "--step-delay-ms", "100")
    assert _request(url, "/health/live")[:3:2] == (200, '{"status":"ok"}')
    running = _send(_port(url), "/v1/generate", {"prompt_ids": PROMPT, "max_new_tokens": 30})
    assert _poll(lambda: _metric(_metrics(url), "adafuse_active_sequences") == 1)
    queued = _send(_port(url), "/v1/generate", {"prompt_ids": PROMPT, "max_new_tokens": 30})
    assert _poll(lambda: _metric(_metrics(url), "adafuse_queue_depth") == 1)
    try:
        code, headers, text = _request(url, "/v1/completions", {"prompt": PROMPT})
        assert (code, headers.get("Retry-After"), json.loads(text)["error"]["message"]) == (
            503, "1", "the request queue is full; retry later")
        code, headers, text = _request(url, "/v1/generate", {"prompt_ids": PROMPT})
        assert (code, headers.get("Retry-After"), json.loads(text)) == (503, "1", {"error": "the request queue is full; retry later"})
        assert _request(url, "/health")[0] == 200 and _request(url, "/health/live")[0] == 200
    finally:
        running.close()
        queued.close()
    assert _poll(lambda: _metric(_metrics(url), "adafuse_requests_cancelled_total") == 2)
