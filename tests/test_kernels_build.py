"""Build the AdaFuse CUDA kernel library with nvcc (sm_80 + sm_90) and check it
without a GPU: exported symbols, host-side argument validation of the C ABI,
the driver floor check, and the Python binding's checks. Runs on the CPU-only CI machine."""
from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from adafuse_export.kernels import build as kbuild
from adafuse_export.kernels import binding as kbind

EXPECTED_SYMBOLS = {
    "adafuse_status_string",
    "adafuse_abi_version",
    "adafuse_required_driver_version",
    "adafuse_check_driver_version",
    "adafuse_check_runtime",
    "adafuse_lora_linear_workspace_size",
    "adafuse_lora_linear",
    "adafuse_switch",
    "adafuse_switch_check_site",
    "adafuse_add_rms_norm",
    "adafuse_rope_kv_write",
    "adafuse_silu_mul",
    "adafuse_decode_attention_workspace_size",
    "adafuse_decode_attention",
    "adafuse_embed",
    "adafuse_norm",
    "adafuse_head_norm",
    "adafuse_act_mul",
    "adafuse_rope_cache_write",
    "adafuse_attention_workspace_size",
    "adafuse_attention",
    "adafuse_gather_rows",
    "adafuse_logits_to_float",
    "adafuse_route_topk",
}

# ADAFUSE_LORA_MAX_ROWS of plugins/kernels/include/adafuse_kernels.h (a documented, checked limit)
LORA_MAX_ROWS = 1 << 17

NVCC = kbuild.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (install the CUDA toolkit "
                                                      "or set CUDA_HOME); the kernel build needs it")


@pytest.fixture(scope="module")
def lib_path(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adafuse_kernels")
    return kbuild.build_library(["80", "90"], cache_dir=out, force=True)


@pytest.fixture(scope="module")
def kernels(lib_path):
    # host-side checks only: this machine may have no CUDA driver (see the driver floor tests)
    return kbind.Kernels(lib_path, check_runtime=False)


@needs_nvcc
def test_library_built_for_sm80_and_sm90(lib_path):
    assert lib_path.is_file() and lib_path.stat().st_size > 0
    cuobjdump = Path(NVCC).with_name("cuobjdump")
    if cuobjdump.is_file():
        listing = subprocess.run([str(cuobjdump), "--list-elf", str(lib_path)],
                                 capture_output=True, text=True, check=True).stdout
        assert "sm_80" in listing and "sm_90" in listing, listing


@needs_nvcc
def test_exports_only_the_c_abi(lib_path):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) not installed")
    out = subprocess.run([nm, "-D", "--defined-only", str(lib_path)], capture_output=True,
                         text=True, check=True).stdout
    syms = {line.split()[-1] for line in out.splitlines() if line.strip()}
    exported = {s for s in syms if not s.startswith("_")}  # ignore _init/_fini style names
    assert EXPECTED_SYMBOLS <= syms, sorted(syms)
    # the static CUDA runtime must stay hidden (no cuda* symbols leak)
    assert not any(s.startswith("cuda") or s.startswith("__cuda") for s in syms), sorted(syms)
    assert exported <= EXPECTED_SYMBOLS, sorted(exported - EXPECTED_SYMBOLS)


@needs_nvcc
def test_abi_version_and_status_strings(kernels):
    assert kernels.lib.adafuse_abi_version() == kbind.ABI_VERSION
    assert kernels.status_string(0) == "ok"
    assert "invalid argument" in kernels.status_string(1)
    assert "workspace" in kernels.status_string(2)
    assert "CUDA" in kernels.status_string(3)
    assert kernels.status_string(4) == "no CUDA driver found"
    assert "driver is older" in kernels.status_string(5)
    assert "unknown" in kernels.status_string(42)


# ---- driver floor -------------------------------------------------------------------
def _toolkit_version() -> tuple[int, int]:
    """CUDA major, minor of the nvcc that built the library ("release 13.0")."""
    out = subprocess.run([NVCC, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    assert m, out
    return int(m.group(1)), int(m.group(2))


def _expected_floor() -> int:
    """The header's rule: max(12.8 for cudaStreamGetDevice, <built major>.0), as 1000 * major + 10 * minor."""
    major, _ = _toolkit_version()
    return max(12080, 1000 * major)


def _installed_driver_version() -> int:
    """cuDriverGetVersion straight from libcuda (0 without a driver): independent of the library."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    v = ctypes.c_int(0)
    return v.value if cuda.cuDriverGetVersion(ctypes.byref(v)) == 0 else 0


def _expected_line(driver: int) -> tuple[int, str]:
    major, minor = _toolkit_version()
    floor = _expected_floor()
    branch = {12080: " (NVIDIA driver r570 or newer)", 13000: " (NVIDIA driver r580 or newer)"}.get(floor, "")
    built, need = f"CUDA {major}.{minor}", f"{floor // 1000}.{floor % 1000 // 10}"
    found = f"{driver // 1000}.{driver % 1000 // 10}"
    if driver == 0:
        return 4, f"no CUDA driver found: the adafuse kernels (built with {built}) need a driver for CUDA >= {need}{branch}"
    if driver < floor:
        return 5, (f"CUDA driver too old: it supports CUDA {found}, the adafuse kernels (built with {built}) need "
                   f"CUDA >= {need}{branch}")
    return 0, f"CUDA driver supports CUDA {found}, the adafuse kernels (built with {built}) need CUDA >= {need}"


@needs_nvcc
def test_driver_floor_follows_the_toolkit(kernels):
    assert kernels.lib.adafuse_required_driver_version() == _expected_floor()
    floor = _expected_floor()
    for driver in (0, 11080, 12040, floor - 10, floor, floor + 10, floor + 1000):
        status, line = kernels.runtime_status(driver)
        assert (status, line) == _expected_line(driver), driver
        assert "\n" not in line
    # a short buffer is cut, never overrun; NULL with size 0 is allowed
    small = ctypes.create_string_buffer(b"\xff" * 12, 12)
    assert kernels.lib.adafuse_check_driver_version(0, small, 10) == kbind.ADAFUSE_ERR_NO_DRIVER
    assert small.raw[:10] == _expected_line(0)[1][:9].encode() + b"\0" and small.raw[10:] == b"\xff" * 2
    assert kernels.lib.adafuse_check_driver_version(0, None, 0) == kbind.ADAFUSE_ERR_NO_DRIVER


@needs_nvcc
def test_loading_checks_the_installed_driver(lib_path, kernels):
    """Kernels(path) and load_kernels refuse a missing or too old driver with the one line naming both
    versions (on a CPU-only machine: "no CUDA driver found ..."); a new enough driver loads."""
    status, line = _expected_line(_installed_driver_version())
    assert kernels.runtime_status() == (status, line)
    if status == kbind.ADAFUSE_OK:
        assert kbind.Kernels(lib_path).path == lib_path
        assert kbind.load_kernels(lib_path) is not None
        return
    for load, shown in ((lambda: kbind.Kernels(lib_path), Path(lib_path)),
                        (lambda: kbind.load_kernels(lib_path), Path(lib_path).resolve())):
        with pytest.raises(kbind.AdafuseKernelError) as err:
            load()
        assert str(err.value) == f"{shown}: {line}"
        assert err.value.status == status
        assert "\n" not in str(err.value)


@needs_nvcc
def test_workspace_size(kernels):
    ws = kernels.lora_linear_workspace_size
    # few rows: fp32 t[rows, top_k, rank], rounded up to 256 bytes, then the shrink's 16-byte flag
    assert ws(1, 4096, 4096, 8, 16, 2) == 256 + 16
    assert ws(16, 4096, 4096, 8, 128, 4) == 16 * 4 * 128 * 4 + 16
    # many rows (adafuse_kernels.h): z [rows, round_up(E*rank, 8)] at 4 bytes, fp32 shrink
    # partials [8 splits of in 4096, rows, E*rank], split final GEMM partials [2 splits for 11008
    # outputs, 64 rows, out] (kept above 64 rows)
    assert ws(512, 4096, 11008, 8, 16, 2) == 512 * 128 * 4 + 8 * 512 * 128 * 4 + 2 * 64 * 11008 * 4
    # 4096 outputs: 4 final splits
    assert ws(64, 4096, 4096, 8, 16, 2) == 64 * 128 * 4 + 8 * 64 * 128 * 4 + 4 * 64 * 4096 * 4
    # E*rank 9 padded to 16 columns; in 37: no splits; parts rounded up to 256 bytes
    assert ws(17, 37, 129, 3, 3, 2) == 1280 + 768
    # never below the few-rows formula (top_k > E: 17 x 8 x 4096 x 4 beats z + partials)
    assert ws(17, 8, 1, 1, 4096, 8) == 17 * 8 * 4096 * 4 + 16
    # callers size the workspace once for their largest row count: it never shrinks with rows
    for cfg in [(4096, 4096, 8, 16, 2), (4096, 11008, 8, 64, 2), (37, 129, 3, 3, 2), (8, 1, 1, 4096, 8),
                (11008, 4096, 256, 8, 8)]:
        sizes = [ws(r, *cfg) for r in list(range(1, 300)) + [511, 512, 513, 2047, 2048, 4096]]
        assert sizes == sorted(sizes), cfg
    # every limit at once (rows 2^17, E*rank 2^20, top_k 8): byte counts past 2^32 stay exact
    assert ws(LORA_MAX_ROWS, 4096, 4096, 256, 4096, 8) == (LORA_MAX_ROWS * 2**20 * 4 * (1 + 8)
                                                          + 4 * 64 * 4096 * 4)
    for bad in [(1, 0, 1, 1, 1, 1), (1, 1, 0, 1, 1, 1), (1, 1, 1, 0, 1, 1), (1, 1, 1, 1, 0, 1),
                (1, 1, 1, 1, 1, 0), (1, 1, 1, 1, 1, 9), (-1, 1, 1, 1, 1, 1), (1, 1, 1, 257, 1, 1),
                (1, 1, 1, 1, 4097, 1), (LORA_MAX_ROWS + 1, 1, 1, 1, 1, 1)]:
        assert kernels.lib.adafuse_lora_linear_workspace_size(*bad) == 0, bad
        with pytest.raises(kbind.AdafuseKernelError, match="invalid sizes"):
            ws(*bad)


def _lora_call(k, dtype=2, rows=1, inf=8, outf=8, x=1, W=1, A=1, B=1, E=1, rank=1, ids=1,
               gates=1, top_k=1, y=1, ws=None, ws_bytes=0, options=None):
    p = lambda v: None if v is None else ctypes.c_void_p(0x1000 * v) if v else None  # noqa: E731
    return k.lib.adafuse_lora_linear(dtype, rows, inf, outf, p(x), p(W), None, p(A), p(B), E, rank,
                                     p(ids), p(gates), top_k, 1.0, p(y),
                                     p(ws) if ws else None, ws_bytes, options, None)


@needs_nvcc
def test_lora_linear_rejects_bad_arguments_without_touching_the_gpu(kernels):
    INV, WS = kbind.ADAFUSE_ERR_INVALID_ARGUMENT, kbind.ADAFUSE_ERR_WORKSPACE
    assert _lora_call(kernels, dtype=7) == INV
    assert _lora_call(kernels, dtype=-1) == INV
    assert _lora_call(kernels, inf=0) == INV
    assert _lora_call(kernels, outf=-3) == INV
    assert _lora_call(kernels, E=0) == INV
    assert _lora_call(kernels, rank=0) == INV
    assert _lora_call(kernels, top_k=0) == INV
    assert _lora_call(kernels, top_k=9) == INV
    assert _lora_call(kernels, x=0) == INV  # NULL x
    assert _lora_call(kernels, W=0) == INV
    assert _lora_call(kernels, ids=0) == INV
    assert _lora_call(kernels, A=0) == INV  # an adapter needs both A and B
    assert _lora_call(kernels, B=0) == INV
    assert _lora_call(kernels, A=0, B=0, ids=0, gates=0, ws=None) == WS  # no adapter: checked as far
    # no adapter at many rows (the dense GEMM, K = in): accepted as far as the workspace check
    assert _lora_call(kernels, rows=17, A=0, B=0, ids=0, gates=0) == WS
    assert _lora_call(kernels, rows=LORA_MAX_ROWS, A=0, B=0, ids=0, gates=0, ws=1, ws_bytes=8) == WS
    assert _lora_call(kernels, y=0) == INV
    assert _lora_call(kernels, ws=None) == WS  # workspace missing
    assert _lora_call(kernels, ws=1, ws_bytes=8) == WS  # too small (needs 272)
    assert _lora_call(kernels, rows=LORA_MAX_ROWS) == WS  # the row limit is accepted (then no workspace)
    assert _lora_call(kernels, rows=LORA_MAX_ROWS + 1) == INV  # one row past the header's limit
    # rows == 0 is a valid no-op (nothing is enqueued)
    assert _lora_call(kernels, rows=0, x=0, W=0, ids=0, y=0) == kbind.ADAFUSE_OK


@needs_nvcc
def test_lora_linear_options_are_checked(kernels):
    """adafuse_lora_options: every field inside its enum (else an invalid argument, before any CUDA
    call); in range, the call gets as far as the workspace check."""
    INV, WS = kbind.ADAFUSE_ERR_INVALID_ARGUMENT, kbind.ADAFUSE_ERR_WORKSPACE
    ok = [kbind.LoraOptions(p, g, s, e) for p in (0, 1) for g in range(len(kbind.GEMV1_SHAPES)) for s in range(3) for e in (0, 1)]
    for o in ok:
        assert _lora_call(kernels, ws=None, options=ctypes.byref(o)) == WS, (o.pdl, o.gemv1, o.shrink)
    for bad in [(2, 0, 0, 0), (-1, 0, 0, 0), (0, len(kbind.GEMV1_SHAPES), 0, 0), (0, -1, 0, 0), (0, 0, 3, 0), (0, 0, -1, 0),
                (0, 0, 0, 2), (0, 0, 0, -1)]:
        assert _lora_call(kernels, ws=None, options=ctypes.byref(kbind.LoraOptions(*bad))) == INV, bad
    # the binding's names map onto the enums, and name a bad one
    assert tuple(getattr(kbind.lora_options(pdl=False, gemv1="u4k2", shrink="warp", exclusive_workspace=True), f)
                 for f in ("pdl", "gemv1", "shrink", "exclusive_workspace")) == (1, 4, 2, 1)
    with pytest.raises(kbind.AdafuseKernelError, match=r"gemv1='u9': expected one of 'auto', 'u4n1'"):
        kbind.lora_options(gemv1="u9")
    with pytest.raises(kbind.AdafuseKernelError, match=r"shrink='block': expected one of 'auto', 'dot', 'warp'"):
        kbind.lora_options(shrink="block")


@needs_nvcc
def test_lora_linear_fp8_weights_are_checked(kernels):
    """ADAFUSE_WEIGHT_FP8_E4M3: weight_dtype and weight_scale must agree, and the call needs 16-bit
    activations, in % 16 == 0 and 16-byte aligned x and W; all refused before any CUDA call.
    Accepted combinations get as far as the workspace check."""
    INV, WS = kbind.ADAFUSE_ERR_INVALID_ARGUMENT, kbind.ADAFUSE_ERR_WORKSPACE
    scale = 0x9000

    def opts(weight_dtype, weight_scale):
        o = kbind.LoraOptions()
        o.weight_dtype, o.weight_scale = weight_dtype, weight_scale
        return ctypes.byref(o)

    fp8 = kbind.WEIGHT_FP8_E4M3
    for dtype in (kbind.DTYPE_FLOAT16, kbind.DTYPE_BFLOAT16):
        assert _lora_call(kernels, dtype=dtype, inf=32, ws=None, options=opts(fp8, scale)) == WS
    assert _lora_call(kernels, inf=32, ws=None, options=opts(kbind.WEIGHT_AS_DTYPE, scale)) == INV  # scale without FP8
    assert _lora_call(kernels, inf=32, ws=None, options=opts(fp8, None)) == INV  # FP8 without scales
    assert _lora_call(kernels, inf=32, ws=None, options=opts(2, scale)) == INV  # no such weight dtype
    assert _lora_call(kernels, inf=32, ws=None, options=opts(-1, None)) == INV
    big = dict(ws=1, ws_bytes=1 << 20)  # past the workspace check
    assert _lora_call(kernels, dtype=kbind.DTYPE_FLOAT32, inf=32, options=opts(fp8, scale), **big) == INV
    assert _lora_call(kernels, inf=24, options=opts(fp8, scale), **big) == INV  # in % 16 != 0
    lib, p = kernels.lib, ctypes.c_void_p
    for x, W in ((0x1008, 0x2000), (0x1000, 0x2008)):  # x or W not 16-byte aligned
        assert lib.adafuse_lora_linear(kbind.DTYPE_BFLOAT16, 1, 32, 8, p(x), p(W), None, p(0x3000), p(0x4000), 1, 1,
                                       p(0x5000), p(0x6000), 1, 1.0, p(0x7000), p(0x1000), 1 << 20,
                                       opts(fp8, scale), None) == INV, (x, W)
    # the binding mirrors the struct: the C layout (4 int32, the weight dtype, padding, a pointer)
    assert ctypes.sizeof(kbind.LoraOptions) == 32 and kbind.LoraOptions.weight_scale.offset == 24


@needs_nvcc
def test_decode_step_ops_reject_bad_arguments_without_touching_the_gpu(kernels):
    INV, OK = kbind.ADAFUSE_ERR_INVALID_ARGUMENT, kbind.ADAFUSE_OK
    p = ctypes.c_void_p(0x1000)
    norm = kernels.lib.adafuse_add_rms_norm
    assert norm(7, 1, 8, p, None, p, 1e-5, p, None) == INV        # dtype
    assert norm(2, -1, 8, p, None, p, 1e-5, p, None) == INV       # rows
    assert norm(2, 1, 0, p, None, p, 1e-5, p, None) == INV        # hidden
    assert norm(2, 1, 8, None, None, p, 1e-5, p, None) == INV     # h NULL
    assert norm(2, 1, 8, p, None, p, -1.0, p, None) == INV        # eps
    assert norm(2, 1, 8, p, None, p, float("nan"), p, None) == INV
    assert norm(2, 0, 8, p, None, p, 1e-5, p, None) == OK         # no rows: nothing enqueued
    rope = kernels.lib.adafuse_rope_kv_write
    args = [2, 1, 1, 4, 2, 8, p, 32, p, 16, p, 16, p, p, p, p, p, p, 16, None]
    for i, bad in ((0, 5), (3, 0), (4, -2), (5, 7), (7, 31), (9, 15), (11, 15), (18, 0), (6, None), (17, None)):
        a = list(args)
        a[i] = bad
        assert rope(*a) == INV, (i, bad)
    a = list(args)
    a[1] = 0  # batch 0: nothing enqueued
    assert rope(*a) == OK
    silu = kernels.lib.adafuse_silu_mul
    assert silu(2, 1, 8, p, p, 7, p, None) == INV                 # ld < inter
    assert silu(2, 1, 0, p, p, 8, p, None) == INV
    assert silu(2, 1, 8, None, p, 16, p, None) == INV
    assert silu(2, 0, 8, p, p, 16, p, None) == OK
    ws = kernels.lib.adafuse_decode_attention_workspace_size
    assert ws(0, 32, 128, 512) == 0 and ws(1, 32, 0, 512) == 0 and ws(1, 32, 128, 0) == 0
    assert ws(2, 32, 128, 512) == 4 * 2 * 32 * (512 // 32) * 130  # float32 chunks of 32 keys at D=128
    attn = kernels.lib.adafuse_decode_attention
    assert attn(2, 1, 32, 32, 128, 512, p, p, p, p, 0, 0.0, p, None, 0, None) == INV      # scale
    assert attn(2, 1, 32, 32, 128, 512, None, p, p, p, 0, 0.1, p, None, 0, None) == INV   # q NULL
    assert attn(2, 1, 32, 32, 128, 512, ctypes.c_void_p(0x1008), p, p, p, 0, 0.1, p, None, 0, None) == INV  # q misaligned
    assert attn(2, 0, 32, 32, 128, 512, p, p, p, p, 0, 0.1, p, None, 0, None) == OK       # no rows


def _refused_one_by_one(fn, args, bad_values, expect):
    """fn(*args) with one argument replaced at a time: each must give `expect`."""
    for i, bad in bad_values:
        a = list(args)
        a[i] = bad
        assert fn(*a) == expect, (fn.__name__, i, bad)


@needs_nvcc
def test_model_ops_reject_bad_arguments_without_touching_the_gpu(kernels):
    """The native backend's model operations check every size, kind and pointer on the host and
    return an invalid argument before any CUDA call (this machine may have no driver); nothing to do
    (no rows) is success without a launch."""
    INV, OK, WS = kbind.ADAFUSE_ERR_INVALID_ARGUMENT, kbind.ADAFUSE_OK, kbind.ADAFUSE_ERR_WORKSPACE
    p = ctypes.c_void_p(0x1000)
    L = kernels.lib
    nan, inf = float("nan"), float("inf")
    # embed(dtype, tokens, hidden, vocab, ids, table, scale, out, stream)
    args = [2, 3, 8, 100, p, p, 1.0, p, None]
    _refused_one_by_one(L.adafuse_embed, args, [(0, 3), (1, -1), (2, 0), (3, 0), (4, None), (5, None), (6, nan),
                                                (6, inf), (7, None)], INV)
    assert L.adafuse_embed(2, 0, 8, 100, p, p, 1.0, p, None) == OK
    # norm(dtype, kind, rows, hidden, h, ldh, delta, ld_delta, weight, eps, out, ldo, stream)
    args = [2, 1, 4, 8, p, 8, p, 8, p, 1e-6, ctypes.c_void_p(0x2000), 8, None]
    _refused_one_by_one(L.adafuse_norm, args, [(0, 5), (1, 2), (1, -1), (2, -1), (3, 0), (4, None), (5, 7), (7, 7),
                                               (8, None), (9, -1.0), (9, nan), (10, None), (11, 7),
                                               (10, p)], INV)  # out == h with a delta
    a = list(args)
    a[6], a[7], a[10] = None, 0, p  # in place without a delta: accepted (no rows: nothing enqueued)
    a[2] = 0
    assert L.adafuse_norm(*a) == OK
    # head_norm(dtype, kind, tokens, heads, head_dim, x, ld, weight, eps, stream)
    args = [1, 0, 5, 4, 64, p, 256, p, 1e-6, None]
    _refused_one_by_one(L.adafuse_head_norm, args, [(0, 4), (1, 3), (2, -1), (3, 0), (4, 0), (5, None), (6, 255),
                                                    (7, None), (8, -1e-6), (2, 1 << 30)], INV)
    a = list(args)
    a[2] = 0
    assert L.adafuse_head_norm(*a) == OK
    # act_mul(dtype, act, rows, inter, gate, up, ld, out, stream)
    args = [2, 1, 3, 8, p, p, 16, p, None]
    _refused_one_by_one(L.adafuse_act_mul, args, [(0, 3), (1, 2), (1, -1), (2, -1), (3, 0), (4, None), (5, None),
                                                  (6, 7), (7, None)], INV)
    a = list(args)
    a[2] = 0
    assert L.adafuse_act_mul(*a) == OK
    # rope_cache_write(dtype, tokens, H, KV, D, R, q, ldq, k, ldk, v, ldv, inv_freq, long_inv_freq, use_long,
    #                  attention_factor, slots, positions, q_out, k_cache, v_cache, max_seq, stream)
    args = [2, 3, 4, 2, 8, 4, p, 32, p, 16, p, 16, p, None, None, 1.0, p, p, p, p, p, 16, None]
    _refused_one_by_one(L.adafuse_rope_cache_write, args,
                        [(0, 3), (1, -1), (2, 0), (3, 0), (4, 0), (5, 0), (5, 3), (5, 10), (6, None), (7, 31),
                         (9, 15), (11, 15), (12, None), (15, nan), (16, None), (17, None), (18, None), (19, None),
                         (20, None), (21, 0)], INV)
    a = list(args)
    a[1] = 0
    assert L.adafuse_rope_cache_write(*a) == OK
    # attention_workspace_size(tokens, num_seqs, H, D, max_seq): float32 chunks of 32 keys at D=128
    ws = L.adafuse_attention_workspace_size
    assert ws(0, 1, 32, 128, 512) == 0 and ws(1, 0, 32, 128, 512) == 0 and ws(1, 1, 0, 128, 512) == 0
    assert ws(1, 1, 32, 0, 512) == 0 and ws(1, 1, 32, 128, 0) == 0
    assert ws(3, 2, 32, 128, 512) == 4 * 3 * 32 * (512 // 32) * 130
    # attention(dtype, tokens, num_seqs, max_seq_tokens, H, KV, D, max_seq, q, k_cache, v_cache, seq_starts,
    #           seq_slots, positions, window, scale, softcap, out, workspace, workspace_bytes, stream)
    attn = L.adafuse_attention
    args = [2, 2, 2, 1, 32, 8, 128, 512, p, p, p, p, p, p, 0, 0.1, 0.0, p, None, 0, None]
    _refused_one_by_one(attn, args, [(0, 3), (1, -1), (2, -1), (3, 0), (4, 36), (5, 0), (6, 96), (6, 512), (7, 0),
                                     (8, None), (9, None), (10, None), (11, None), (12, None), (13, None),
                                     (15, 0.0), (15, nan), (16, -1.0), (16, nan), (17, None),
                                     (1, 3),  # one query per sequence at most when max_seq_tokens is 1
                                     (2, 70000), (8, ctypes.c_void_p(0x1008))], INV)
    assert attn(*args) == WS  # the decode kernel needs its workspace
    a = list(args)
    a[1] = 0
    assert attn(*a) == OK
    # gather_rows(dtype, rows, cols, src, ld_src, index, dst, ld_dst, stream)
    args = [2, 3, 8, p, 8, p, p, 8, None]
    _refused_one_by_one(L.adafuse_gather_rows, args, [(0, 3), (1, -1), (2, 0), (3, None), (4, 7), (5, None),
                                                      (6, None), (7, 7)], INV)
    a = list(args)
    a[1] = 0
    assert L.adafuse_gather_rows(*a) == OK
    # logits_to_float(dtype, rows, vocab, in, ld_in, softcap, out, stream)
    args = [2, 3, 1000, p, 1000, 30.0, p, None]
    _refused_one_by_one(L.adafuse_logits_to_float, args, [(0, 3), (1, -1), (2, 0), (3, None), (4, 999), (5, -1.0),
                                                          (5, nan), (5, inf), (6, None)], INV)
    a = list(args)
    a[1] = 0
    assert L.adafuse_logits_to_float(*a) == OK
    # route_topk(dtype, rows, in, x, ldx, weight, bias, experts, top_k, normalize, ids, gates, stream)
    args = [2, 3, 64, p, 64, p, None, 8, 2, 1, p, p, None]
    _refused_one_by_one(L.adafuse_route_topk, args, [(0, 3), (1, -1), (2, 0), (3, None), (4, 63), (5, None),
                                                     (7, 0), (7, 257), (8, 0), (8, 9), (10, None),
                                                     (11, None)], INV)
    a = list(args)
    a[7], a[8] = 2, 3  # top_k above the experts
    assert L.adafuse_route_topk(*a) == INV
    a = list(args)
    a[1] = 0
    assert L.adafuse_route_topk(*a) == OK


@needs_nvcc
def test_decode_attention_shape_rule_matches_the_library(kernels):
    """The binding's decode_attention_supported (which the decoder asks before choosing the kernel
    over SDPA) must accept exactly the shapes the C function accepts: an accepted shape gets as far
    as the workspace check (status 2), a refused one is an invalid argument (status 1)."""
    p = ctypes.c_void_p(0x1000)
    for dtype, code in (("float32", 0), ("float16", 1), ("bfloat16", 2)):
        for H, KV in ((32, 32), (32, 8), (28, 4), (8, 1), (9, 1), (36, 4), (6, 4), (4, 0)):
            for D in (2, 4, 8, 16, 24, 32, 64, 96, 128, 256, 512):
                status = kernels.lib.adafuse_decode_attention(code, 1, H, KV, D, 64, p, p, p, p, 0, 0.1, p, None, 0,
                                                              None)
                expect = kbind.decode_attention_supported(dtype, H, KV, D)
                assert status == (kbind.ADAFUSE_ERR_WORKSPACE if expect else kbind.ADAFUSE_ERR_INVALID_ARGUMENT), \
                    (dtype, H, KV, D, status)


@needs_nvcc
def test_switch_rejects_bad_arguments_without_touching_the_gpu(kernels):
    INV = kbind.ADAFUSE_ERR_INVALID_ARGUMENT
    p = ctypes.c_void_p(0x1000)
    sw = kernels.lib.adafuse_switch
    assert sw(9, p, 1, 8, 8, p, p, p, p, 2, 0, None) == INV      # dtype
    assert sw(2, p, -1, 8, 8, p, p, p, p, 2, 0, None) == INV     # num_sites
    assert sw(2, None, 3, 8, 8, p, p, p, p, 2, 0, None) == INV   # sites NULL
    assert sw(2, p, 1, 0, 8, p, p, p, p, 2, 0, None) == INV      # max_out
    assert sw(2, p, 1, 8, 0, p, p, p, p, 2, 0, None) == INV      # max_in
    assert sw(2, p, 1, 8, 8, p, p, p, p, 0, 0, None) == INV      # top_k
    assert sw(2, p, 1, 8, 8, p, p, p, p, 9, 0, None) == INV
    assert sw(2, p, 1, 8, 8, None, p, p, p, 2, 0, None) == INV   # route arrays
    assert sw(2, p, 1, 8, 8, p, p, p, None, 2, 0, None) == INV
    # no sites and no update: nothing to do
    assert sw(2, None, 0, 8, 8, p, p, p, p, 2, 0, None) == kbind.ADAFUSE_OK


def test_switch_site_layout_matches_the_header(tmp_path):
    # adafuse_switch_site: 4 pointers, 4 int32, float, int32 (base_dtype), pointer (base_scale) -> 64 bytes on 64-bit
    assert kbind.SWITCH_SITE_DTYPE_SIZE == 64
    assert kbind.SwitchSite.out_features.offset == 32
    assert kbind.SwitchSite.scale.offset == 48
    assert kbind.SwitchSite.base_dtype.offset == 52
    assert kbind.SwitchSite.base_scale.offset == 56
    cc = shutil.which("cc") or shutil.which("gcc")
    cuda_inc = Path(NVCC).parent.parent / "include" if NVCC else None
    if cc is None or cuda_inc is None or not (cuda_inc / "cuda_runtime_api.h").is_file():
        pytest.skip("no C compiler or CUDA headers to cross-check the struct layout")
    src = tmp_path / "layout.c"
    src.write_text(
        '#include <stdio.h>\n#include <stddef.h>\n#include "adafuse_kernels.h"\n'
        'int main(void){printf("%zu %zu %zu %zu %zu %d %d\\n", sizeof(adafuse_switch_site),'
        ' offsetof(adafuse_switch_site, out_features), offsetof(adafuse_switch_site, scale),'
        ' offsetof(adafuse_switch_site, base_dtype), offsetof(adafuse_switch_site, base_scale),'
        ' (int)ADAFUSE_WEIGHT_AS_DTYPE, (int)ADAFUSE_WEIGHT_FP8_E4M3); return 0;}\n')
    exe = tmp_path / "layout"
    subprocess.run([cc, f"-I{kbuild.kernel_root() / 'include'}", f"-I{cuda_inc}", str(src), "-o",
                    str(exe)], check=True)
    got = tuple(map(int, subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()))
    assert got == (
        ctypes.sizeof(kbind.SwitchSite), kbind.SwitchSite.out_features.offset,
        kbind.SwitchSite.scale.offset, kbind.SwitchSite.base_dtype.offset, kbind.SwitchSite.base_scale.offset,
        kbind.WEIGHT_AS_DTYPE, kbind.WEIGHT_FP8_E4M3)


@needs_nvcc
def test_switch_check_site_is_the_fp8_base_contract(kernels):
    """adafuse_switch_check_site (host memory, no GPU): an FP8 W_base needs a 16-bit dtype, pristine mode (W_base set)
    and its per-row scales; a dtype base takes no scales; unknown base_dtype / dtype and a NULL record are refused."""
    INV, OK = kbind.ADAFUSE_ERR_INVALID_ARGUMENT, kbind.ADAFUSE_OK
    p = 0x1000

    def site(base=p, base_dtype=kbind.WEIGHT_AS_DTYPE, base_scale=None):
        return kbind.SwitchSite(p, base, p, p, 64, 32, 4, 8, 1.0, base_dtype, base_scale)

    def status(dtype, s):
        return kernels.lib.adafuse_switch_check_site(dtype, ctypes.byref(s))

    FP8 = kbind.WEIGHT_FP8_E4M3
    for dt in (kbind.DTYPE_FLOAT16, kbind.DTYPE_BFLOAT16):
        assert status(dt, site(base_dtype=FP8, base_scale=p)) == OK
        assert status(dt, site(base=None, base_dtype=FP8, base_scale=p)) == INV   # in-place mode
        assert status(dt, site(base_dtype=FP8, base_scale=None)) == INV           # no scales
    assert status(kbind.DTYPE_FLOAT32, site(base_dtype=FP8, base_scale=p)) == INV  # fp32 model
    for dt in (kbind.DTYPE_FLOAT32, kbind.DTYPE_FLOAT16, kbind.DTYPE_BFLOAT16):
        assert status(dt, site()) == OK                       # pristine, dtype base
        assert status(dt, site(base=None)) == OK              # in place
        assert status(dt, site(base_scale=p)) == INV          # scales without an FP8 base
        assert status(dt, site(base_dtype=2, base_scale=p)) == INV
        assert status(dt, site(base_dtype=-1)) == INV
    assert status(9, site()) == INV
    assert kernels.lib.adafuse_switch_check_site(kbind.DTYPE_BFLOAT16, None) == INV
    with pytest.raises(kbind.AdafuseKernelError, match=r"adafuse_switch_check_site failed: .*\(status 1\)"):
        kernels.check_site("float16", site(base=None, base_dtype=FP8, base_scale=p))
    kernels.check_site("bfloat16", site(base_dtype=FP8, base_scale=p))


@needs_nvcc
@pytest.mark.parametrize("diag", [False, True])
def test_switch_diagnostic_kernels_only_in_the_diagnostic_build(tmp_path, diag):
    # -DADAFUSE_DIAGNOSTICS (benchmarks/switch_bound.py) adds resident-kernel instantiations that skip
    # the product (kSkip 1) or the whole delta (kSkip 2) and write wrong weights by design, and
    # adafuse_switch_diagnostic that runs them: they must compile warning-free there and be absent
    # from the shipped library.
    src = kbuild.kernel_root() / "src" / "switch.cu"
    ptx = tmp_path / "switch.ptx"
    flags = [kbind.DIAGNOSTICS_FLAG] if diag else []
    subprocess.run([NVCC, "-std=c++17", "-O3", "-arch=sm_90", "-Werror", "all-warnings", *flags,
                    f"-I{kbuild.kernel_root() / 'include'}", "-ptx", str(src), "-o", str(ptx)], check=True)
    entries = [ln for ln in ptx.read_text().splitlines() if ".entry" in ln and "switch_resident_kernel" in ln]
    kinds = {k for k in ("Li0EE", "Li1EE", "Li2EE") if any(k in ln for ln in entries)}
    assert kinds == ({"Li0EE", "Li1EE", "Li2EE"} if diag else {"Li0EE"}), entries


@needs_nvcc
def test_shipped_library_has_no_diagnostic_entry_point(kernels):
    assert not hasattr(kernels.lib, "adafuse_switch_diagnostic")
    torch = pytest.importorskip("torch")
    with pytest.raises(kbind.AdafuseKernelError, match=r"variant='no_mma' needs a benchmark build of the kernels "
                                                       r"\(-DADAFUSE_DIAGNOSTICS\)"):
        kernels.switch(torch.bfloat16, None, 0, 1, 1, None, None, None, None, variant="no_mma")
    with pytest.raises(kbind.AdafuseKernelError, match=r"variant='v3': expected one of 'default', 'chunked'"):
        kernels.switch(torch.bfloat16, None, 0, 1, 1, None, None, None, None, variant="v3")


def test_kernel_sources_read_no_environment():
    """Choices are arguments (adafuse_lora_options, adafuse_switch_diagnostic in benchmark builds):
    the kernel library reads no environment variable, not even in its benchmark build."""
    calls = re.compile(r"\b(getenv|secure_getenv|environ)\b")
    for path in sorted((kbuild.kernel_root() / "src").glob("*")) + sorted((kbuild.kernel_root() / "include").glob("*")):
        hits = [f"{path.name}:{i}: {ln.strip()}" for i, ln in enumerate(path.read_text().splitlines(), 1)
                if calls.search(ln)]
        assert not hits, hits


def test_kernels_are_named_by_role():
    """No version-history names (switch_v3_kernel, v3_stages, gemv_v2, ...) in the kernel sources:
    no identifier with a part like v3 / v3a (loop indices such as v0 are single parts)."""
    ident, version = re.compile(r"\b[A-Za-z_]\w*\b"), re.compile(r"v\d+[a-z]?")
    for path in sorted((kbuild.kernel_root() / "src").glob("*")) + sorted((kbuild.kernel_root() / "include").glob("*")):
        for i, ln in enumerate(path.read_text().splitlines(), 1):
            names = [w for w in ident.findall(ln) if "_" in w and any(version.fullmatch(part) for part in w.split("_"))]
            assert not names, f"{path.name}:{i}: {names}"


def test_dtype_mapping():
    assert kbind.dtype_code("float32") == kbind.DTYPE_FLOAT32
    assert kbind.dtype_code("bf16") == kbind.DTYPE_BFLOAT16
    assert kbind.dtype_code("float16") == kbind.DTYPE_FLOAT16
    with pytest.raises(kbind.AdafuseKernelError, match="unsupported dtype"):
        kbind.dtype_code("int8")


@needs_nvcc
def test_binding_checks_tensors_before_any_cuda_call(kernels):
    torch = pytest.importorskip("torch")
    x = torch.zeros(2, 8, dtype=torch.bfloat16)
    W = torch.zeros(4, 8, dtype=torch.bfloat16)
    A = torch.zeros(3, 2, 8, dtype=torch.bfloat16)
    B = torch.zeros(3, 4, 2, dtype=torch.bfloat16)
    ids = torch.zeros(2, 2, dtype=torch.int32)
    g = torch.zeros(2, 2, dtype=torch.float32)
    with pytest.raises(kbind.AdafuseKernelError, match="x must be a CUDA tensor"):
        kernels.lora_linear(x, W, A, B, ids, g, 1.0)
    with pytest.raises(kbind.AdafuseKernelError, match="x must be a torch.Tensor"):
        kernels.lora_linear([[1.0]], W, A, B, ids, g, 1.0)
    with pytest.raises(kbind.AdafuseKernelError, match="x must be a CUDA tensor"):
        kernels.linear(x, W)
    with pytest.raises(kbind.AdafuseKernelError, match="exclusive_workspace=True needs a workspace kept per call site"):
        kernels.lora_linear(x, W, A, B, ids, g, 1.0, exclusive_workspace=True)
    with pytest.raises(kbind.AdafuseKernelError, match=r"gemv1='fast'"):
        kernels.lora_linear(x, W, A, B, ids, g, 1.0, gemv1="fast")
    with pytest.raises(kbind.AdafuseKernelError, match="unsupported dtype"):
        kbind.dtype_code(torch.int8)
    with pytest.raises(kbind.AdafuseKernelError, match="must be a CUDA tensor"):
        kernels.pack_sites([dict(W=W, A=A, B=B, scale=1.0)])
    # FP8 bases: the rules name the site before any tensor check (pristine, 16-bit W, base_scale)
    q = torch.zeros(4, 8, dtype=torch.float8_e4m3fn)
    s = torch.ones(4, dtype=torch.float32)
    with pytest.raises(kbind.AdafuseKernelError, match=r"sites\[0\]\.W is FP8: the switch writes the merged weight in "
                                                       r"the model dtype; pass the FP8 weight as W_base"):
        kernels.pack_sites([dict(W=q, A=A, B=B)])
    with pytest.raises(kbind.AdafuseKernelError, match=r"sites\[0\]: an FP8 W_base needs W float16 or bfloat16, "
                                                       r"got torch.float32"):
        kernels.pack_sites([dict(W=W.float(), W_base=q, base_scale=s, A=A.float(), B=B.float())])
    with pytest.raises(kbind.AdafuseKernelError, match=r"sites\[0\]: an FP8 W_base needs base_scale \[4\] float32"):
        kernels.pack_sites([dict(W=W, W_base=q, A=A, B=B)])
    with pytest.raises(kbind.AdafuseKernelError, match=r"sites\[0\]\.base_scale is for an FP8 W_base "
                                                       r"\(torch.float8_e4m3fn\); W_base is torch.bfloat16"):
        kernels.pack_sites([dict(W=W, W_base=W, base_scale=s, A=A, B=B)])
    with pytest.raises(kbind.AdafuseKernelError, match=r"sites\[0\]\.W must be a CUDA tensor"):
        kernels.pack_sites([dict(W=W, W_base=q, base_scale=s, A=A, B=B)])  # the FP8 rules hold: on to the tensors
    h = torch.zeros(2, 8, dtype=torch.bfloat16)
    with pytest.raises(kbind.AdafuseKernelError, match="h must be a CUDA tensor"):
        kernels.add_rms_norm(h, None, torch.ones(8, dtype=torch.bfloat16), 1e-5)
    gu = torch.zeros(2, 16, dtype=torch.bfloat16)
    with pytest.raises(kbind.AdafuseKernelError, match="gate must be a CUDA"):
        kernels.silu_mul(gu[:, :8], gu[:, 8:])
    cache = torch.zeros(1, 2, 4, 4, dtype=torch.bfloat16)
    with pytest.raises(kbind.AdafuseKernelError, match="q must be a CUDA"):
        kernels.rope_kv_write(torch.zeros(1, 16, dtype=torch.bfloat16), torch.zeros(1, 8, dtype=torch.bfloat16),
                              torch.zeros(1, 8, dtype=torch.bfloat16), torch.zeros(1, 4, dtype=torch.bfloat16),
                              torch.zeros(1, 4, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.int64), cache, cache,
                              seq=1, num_heads=4, num_kv_heads=2)
    with pytest.raises(kbind.AdafuseKernelError, match="q must be a CUDA tensor"):
        kernels.decode_attention(torch.zeros(1, 16, dtype=torch.bfloat16), cache, cache,
                                 torch.zeros(1, dtype=torch.int64), num_heads=4, scale=0.5)


def test_build_reports_missing_nvcc(monkeypatch, tmp_path):
    with pytest.raises(kbuild.KernelBuildError, match="nvcc not found"):
        monkeypatch.setattr(kbuild, "find_nvcc", lambda: None)
        kbuild.build_library(["90"], cache_dir=tmp_path)


def test_bad_arch_is_rejected(tmp_path):
    with pytest.raises(kbuild.KernelBuildError, match="bad CUDA arch"):
        kbuild.build_library(["ninety"], cache_dir=tmp_path, nvcc="/bin/true")
