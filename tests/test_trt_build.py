"""trt/build.py: builder settings with the real TensorRT-RTX builder (it runs on the CPU) and the
timing-cache contract (RTX's timing-cache calls are no-ops, so a refusal is played by a double
whose API test_tensorrt_runner.py checks against the real IBuilderConfig)."""
from __future__ import annotations

import re

import pytest

from adafuse_export.errors import AdafuseError
from adafuse_export.trt.backends import Backend, select_backend
from adafuse_export.trt.build import attach_timing_cache, builder_config
from trt_doubles import RecordingTimingCacheConfig

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is installed by .ci/run; its builder runs on the CPU")


@pytest.mark.parametrize("dtype, tf32", [("float32", False), ("float16", True), ("bfloat16", True)])
def test_float32_engines_do_not_use_tf32(dtype, tf32):
    backend = select_backend("tensorrt-rtx")
    builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    assert builder.create_builder_config().get_flag(trt.BuilderFlag.TF32)  # TensorRT's default
    assert builder_config(backend, builder, dtype).get_flag(trt.BuilderFlag.TF32) == tf32


def test_rtx_leaves_a_timing_cache_file_alone(tmp_path):
    cache = tmp_path / "cache.bin"
    cache.write_bytes(b"not a timing cache")
    lines: list[str] = []
    config = trt.Builder(trt.Logger(trt.Logger.ERROR)).create_builder_config()
    assert attach_timing_cache(select_backend("tensorrt-rtx"), config, cache, lines.append) is None
    assert lines == [f"--timing-cache {cache}: not used (TensorRT-RTX has no timing cache); the file is left unchanged"]
    assert cache.read_bytes() == b"not a timing cache"


def test_a_refused_timing_cache_is_an_error(tmp_path):
    full = Backend("tensorrt", trt, "10.14")
    cache = tmp_path / "cache.bin"
    cache.write_bytes(b"cache from another GPU")
    calls: list = []
    with pytest.raises(AdafuseError, match=re.escape(f"--timing-cache {cache}: tensorrt 10.14 refused this timing cache")):
        attach_timing_cache(full, RecordingTimingCacheConfig(calls, accepts=False), cache, print)
    assert calls == [("create_timing_cache", b"cache from another GPU"), ("set_timing_cache", False)]
    assert cache.read_bytes() == b"cache from another GPU"
    calls.clear()
    assert attach_timing_cache(full, RecordingTimingCacheConfig(calls, accepts=True), tmp_path / "new.bin", print) is not None
    assert calls == [("create_timing_cache", b""), ("set_timing_cache", False)]
    with pytest.raises(AdafuseError, match=f"--timing-cache {re.escape(str(tmp_path))}: expected a TensorRT timing cache, found a directory"):
        attach_timing_cache(full, RecordingTimingCacheConfig(calls, accepts=True), tmp_path, print)
