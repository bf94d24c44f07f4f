"""ctypes binding of libadafuse_kernels.so over torch CUDA tensors.

All calls enqueue on torch's current CUDA stream (``torch.cuda.current_stream()``)
unless a stream is given, so they compose with torch ops and CUDA graph capture.
A nonzero status from the library raises :class:`AdafuseKernelError`; argument
problems found in Python raise it too (before anything reaches the GPU). Loading the
library checks the CUDA driver against the floor of the toolkit it was built with
(adafuse_check_runtime) and raises with that one line when the driver is missing or
too old.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

ADAFUSE_OK = 0
ADAFUSE_ERR_INVALID_ARGUMENT = 1
ADAFUSE_ERR_WORKSPACE = 2
ADAFUSE_ERR_CUDA = 3
ADAFUSE_ERR_NO_DRIVER = 4
ADAFUSE_ERR_DRIVER_TOO_OLD = 5
ABI_VERSION = 4

DTYPE_FLOAT32 = 0
DTYPE_FLOAT16 = 1
DTYPE_BFLOAT16 = 2
_DTYPE_NAMES = {"float32": DTYPE_FLOAT32, "float16": DTYPE_FLOAT16, "bfloat16": DTYPE_BFLOAT16}


ATTN_MAX_GROUP = 8  # ADAFUSE_ATTN_MAX_GROUP

# adafuse_lora_options' enums (adafuse_kernels.h), by the names the keyword arguments take
GEMV1_SHAPES = {"auto": 0, "u4n1": 1, "u8n1": 2, "u4n2": 3, "u4k2": 4, "simt": 5}
SHRINK_KINDS = {"auto": 0, "dot": 1, "warp": 2}
WEIGHT_AS_DTYPE = 0  # adafuse_weight_dtype: W has x's dtype
WEIGHT_FP8_E4M3 = 1  # W float8 e4m3 with float32 per-output-channel scales
# adafuse_switch_variant: adafuse_switch_diagnostic exists in builds with -DADAFUSE_DIAGNOSTICS only
SWITCH_VARIANTS = {"default": 0, "chunked": 1, "resident_2pb": 2, "no_mma": 3, "no_delta": 4}
# adafuse_norm_kind and adafuse_activation, by the names of families.base.NORMS / ACTIVATIONS
NORM_KINDS = {"rms": 0, "rms_one_plus": 1}
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}
MAX_TOP_K = 8  # ADAFUSE_MAX_TOP_K
LORA_MAX_EXPERTS = 256  # ADAFUSE_LORA_MAX_EXPERTS
DIAGNOSTICS_FLAG = "-DADAFUSE_DIAGNOSTICS"


def decode_attention_supported(dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether adafuse_decode_attention takes these shapes (the header's conditions)."""
    try:
        size = 4 if dtype_code(dtype) == DTYPE_FLOAT32 else 2
    except AdafuseKernelError:
        return False
    if num_kv_heads <= 0 or num_heads % num_kv_heads or num_heads // num_kv_heads > ATTN_MAX_GROUP:
        return False
    vectors, rest = divmod(head_dim * size, 16)
    return rest == 0 and 0 < vectors <= 32 and vectors & (vectors - 1) == 0


class AdafuseKernelError(RuntimeError):
    """A kernel call was refused (bad argument) or failed (CUDA error)."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


class SwitchSite(ctypes.Structure):
    """Mirror of adafuse_switch_site (64 bytes on 64-bit)."""

    _fields_ = [
        ("W", ctypes.c_void_p),
        ("W_base", ctypes.c_void_p),
        ("A", ctypes.c_void_p),
        ("B", ctypes.c_void_p),
        ("out_features", ctypes.c_int32),
        ("in_features", ctypes.c_int32),
        ("rank", ctypes.c_int32),
        ("num_experts", ctypes.c_int32),
        ("scale", ctypes.c_float),
        ("base_dtype", ctypes.c_int32),  # adafuse_weight_dtype of W_base
        ("base_scale", ctypes.c_void_p),  # [out] float32 with an FP8 W_base, else NULL
    ]


SWITCH_SITE_DTYPE_SIZE = ctypes.sizeof(SwitchSite)


class LoraOptions(ctypes.Structure):
    """Mirror of adafuse_lora_options (all zero: the library's choices)."""

    _fields_ = [
        ("pdl", ctypes.c_int32),
        ("gemv1", ctypes.c_int32),
        ("shrink", ctypes.c_int32),
        ("exclusive_workspace", ctypes.c_int32),
        ("weight_dtype", ctypes.c_int32),
        ("weight_scale", ctypes.c_void_p),
    ]


def _choice(option: str, value: str, table: Dict[str, int]) -> int:
    if value not in table:
        raise AdafuseKernelError(f"{option}={value!r}: expected one of {', '.join(map(repr, table))}",
                                 ADAFUSE_ERR_INVALID_ARGUMENT)
    return table[value]


def lora_options(*, pdl: bool = True, gemv1: str = "auto", shrink: str = "auto",
                 exclusive_workspace: bool = False) -> LoraOptions:
    """adafuse_lora_options from keyword arguments (names as in GEMV1_SHAPES / SHRINK_KINDS)."""
    return LoraOptions(0 if pdl else 1, _choice("gemv1", gemv1, GEMV1_SHAPES),
                       _choice("shrink", shrink, SHRINK_KINDS), 1 if exclusive_workspace else 0)


def _torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise AdafuseKernelError("torch is required for the kernel binding: pip install torch") from exc
    return torch


def dtype_code(dtype: Any) -> int:
    """Map a torch dtype (or 'float32' / 'float16' / 'bfloat16') to adafuse_dtype."""
    name = dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "")
    name = {"float": "float32", "half": "float16", "fp32": "float32", "fp16": "float16",
            "bf16": "bfloat16"}.get(name, name)
    if name not in _DTYPE_NAMES:
        raise AdafuseKernelError(
            f"unsupported dtype {dtype}: the kernels take float32, float16 or bfloat16",
            ADAFUSE_ERR_INVALID_ARGUMENT)
    return _DTYPE_NAMES[name]


def _check_rows(name: str, t: Any, *, dtype=None, shape: Optional[Sequence[int]] = None, device=None) -> None:
    """A 2-D CUDA tensor whose rows may be strided (a view of a wider output) but whose columns are
    contiguous, as the kernels' row-stride arguments take."""
    torch = _torch()
    if not isinstance(t, torch.Tensor) or not t.is_cuda or t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1) \
            or t.stride(0) < t.shape[1]:
        desc = f"{type(t).__name__} {tuple(t.shape)} strides {t.stride()} on {t.device}" \
            if isinstance(t, torch.Tensor) else type(t).__name__
        raise AdafuseKernelError(f"{name} must be a 2-D CUDA tensor with unit column stride, got {desc}",
                                 ADAFUSE_ERR_INVALID_ARGUMENT)
    if device is not None and t.device != device:
        raise AdafuseKernelError(f"{name} is on {t.device}, expected {device}", ADAFUSE_ERR_INVALID_ARGUMENT)
    if dtype is not None and t.dtype != dtype:
        raise AdafuseKernelError(f"{name} must have dtype {dtype}, got {t.dtype}", ADAFUSE_ERR_INVALID_ARGUMENT)
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise AdafuseKernelError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}",
                                 ADAFUSE_ERR_INVALID_ARGUMENT)


def _check_tensor(name: str, t: Any, *, dtype=None, shape: Optional[Sequence[int]] = None,
                  device=None) -> None:
    torch = _torch()
    if not isinstance(t, torch.Tensor):
        raise AdafuseKernelError(f"{name} must be a torch.Tensor, got {type(t).__name__}",
                                 ADAFUSE_ERR_INVALID_ARGUMENT)
    if not t.is_cuda:
        raise AdafuseKernelError(f"{name} must be a CUDA tensor (got device {t.device})",
                                 ADAFUSE_ERR_INVALID_ARGUMENT)
    if device is not None and t.device != device:
        raise AdafuseKernelError(f"{name} is on {t.device}, expected {device}",
                                 ADAFUSE_ERR_INVALID_ARGUMENT)
    if dtype is not None and t.dtype != dtype:
        raise AdafuseKernelError(f"{name} must have dtype {dtype}, got {t.dtype}",
                                 ADAFUSE_ERR_INVALID_ARGUMENT)
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise AdafuseKernelError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}",
                                 ADAFUSE_ERR_INVALID_ARGUMENT)
    if not t.is_contiguous():
        raise AdafuseKernelError(f"{name} must be contiguous", ADAFUSE_ERR_INVALID_ARGUMENT)


class Kernels:
    """The loaded library. ``Kernels(path)`` or :func:`load_kernels` (builds if needed).

    check_runtime=False skips the driver check (for host-side tests of a library on a machine
    without a driver; nothing can run there)."""

    def __init__(self, path: Union[str, Path], *, check_runtime: bool = True):
        self.path = Path(path)
        try:
            self.lib = ctypes.CDLL(str(self.path))
        except OSError as exc:
            raise AdafuseKernelError(f"cannot load {self.path}: {exc}") from exc
        L = self.lib
        L.adafuse_status_string.restype = ctypes.c_char_p
        L.adafuse_status_string.argtypes = [ctypes.c_int]
        L.adafuse_abi_version.restype = ctypes.c_int
        L.adafuse_abi_version.argtypes = []
        L.adafuse_lora_linear_workspace_size.restype = ctypes.c_size_t
        L.adafuse_lora_linear_workspace_size.argtypes = [ctypes.c_int] * 6
        vp, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        L.adafuse_lora_linear.restype = ctypes.c_int
        L.adafuse_lora_linear.argtypes = [i, i, i, i, vp, vp, vp, vp, vp, i, i, vp, vp, i, f, vp,
                                          vp, ctypes.c_size_t, ctypes.POINTER(LoraOptions), vp]
        L.adafuse_switch.restype = ctypes.c_int
        L.adafuse_switch.argtypes = [i, vp, i, i, i, vp, vp, vp, vp, i, i, vp]
        L.adafuse_switch_check_site.restype = ctypes.c_int
        L.adafuse_switch_check_site.argtypes = [i, ctypes.POINTER(SwitchSite)]
        self._switch_diagnostic = getattr(L, "adafuse_switch_diagnostic", None)  # benchmark builds only
        if self._switch_diagnostic is not None:
            self._switch_diagnostic.restype = ctypes.c_int
            self._switch_diagnostic.argtypes = [i, i, vp, i, i, i, vp, vp, vp, vp, i, i, vp]
        L.adafuse_required_driver_version.restype = i
        L.adafuse_required_driver_version.argtypes = []
        L.adafuse_check_driver_version.restype = i
        L.adafuse_check_driver_version.argtypes = [i, ctypes.c_char_p, ctypes.c_size_t]
        L.adafuse_check_runtime.restype = i
        L.adafuse_check_runtime.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        ll, sz = ctypes.c_longlong, ctypes.c_size_t
        L.adafuse_add_rms_norm.restype = ctypes.c_int
        L.adafuse_add_rms_norm.argtypes = [i, i, i, vp, vp, vp, f, vp, vp]
        L.adafuse_rope_kv_write.restype = ctypes.c_int
        L.adafuse_rope_kv_write.argtypes = [i, i, i, i, i, i, vp, ll, vp, ll, vp, ll, vp, vp, vp, vp, vp, vp, i, vp]
        L.adafuse_silu_mul.restype = ctypes.c_int
        L.adafuse_silu_mul.argtypes = [i, i, i, vp, vp, ll, vp, vp]
        L.adafuse_decode_attention_workspace_size.restype = sz
        L.adafuse_decode_attention_workspace_size.argtypes = [i, i, i, i]
        L.adafuse_decode_attention.restype = ctypes.c_int
        L.adafuse_decode_attention.argtypes = [i, i, i, i, i, i, vp, vp, vp, vp, i, f, vp, vp, sz, vp]
        u8p = ctypes.c_void_p
        for name, res, args in (
                ("adafuse_embed", i, [i, i, i, ll, vp, vp, f, vp, vp]),
                ("adafuse_norm", i, [i, i, i, i, vp, ll, vp, ll, vp, f, vp, ll, vp]),
                ("adafuse_head_norm", i, [i, i, i, i, i, vp, ll, vp, f, vp]),
                ("adafuse_act_mul", i, [i, i, i, i, vp, vp, ll, vp, vp]),
                ("adafuse_rope_cache_write", i, [i, i, i, i, i, i, vp, ll, vp, ll, vp, ll, vp, vp, u8p, f, vp, vp, vp,
                                                 vp, vp, i, vp]),
                ("adafuse_attention_workspace_size", sz, [i, i, i, i, i]),
                ("adafuse_attention", i, [i, i, i, i, i, i, i, i, vp, vp, vp, vp, vp, vp, i, f, f, vp, vp, sz, vp]),
                ("adafuse_gather_rows", i, [i, i, i, vp, ll, vp, vp, ll, vp]),
                ("adafuse_logits_to_float", i, [i, i, ll, vp, ll, f, vp, vp]),
                ("adafuse_route_topk", i, [i, i, i, vp, ll, vp, vp, i, i, i, vp, vp, vp])):
            fn = getattr(L, name)
            fn.restype, fn.argtypes = res, args
        v = L.adafuse_abi_version()
        if v != ABI_VERSION:
            raise AdafuseKernelError(f"{self.path} has ABI version {v}, binding expects {ABI_VERSION}")
        if check_runtime:
            self.check_runtime()

    # ---- driver floor ------------------------------------------------------
    def runtime_status(self, driver_version: Optional[int] = None) -> Tuple[int, str]:
        """(status, one line) of adafuse_check_runtime, or of adafuse_check_driver_version for a
        given driver version (cudaDriverGetVersion's encoding, 0 = none)."""
        buf = ctypes.create_string_buffer(512)
        if driver_version is None:
            st = self.lib.adafuse_check_runtime(buf, len(buf))
        else:
            st = self.lib.adafuse_check_driver_version(int(driver_version), buf, len(buf))
        return st, buf.value.decode()

    def check_runtime(self) -> None:
        """Raise AdafuseKernelError naming the driver's and the build's CUDA versions when the
        installed driver is missing or older than this build of the library needs."""
        st, line = self.runtime_status()
        if st != ADAFUSE_OK:
            raise AdafuseKernelError(f"{self.path}: {line}", st)

    # ---- raw helpers -------------------------------------------------------
    def status_string(self, status: int) -> str:
        return self.lib.adafuse_status_string(int(status)).decode()

    def _raise_if(self, status: int, what: str) -> None:
        if status != ADAFUSE_OK:
            raise AdafuseKernelError(f"{what} failed: {self.status_string(status)} (status {status})",
                                     status)

    @staticmethod
    def _stream_handle(stream) -> int:
        if stream is None:
            return _torch().cuda.current_stream().cuda_stream
        if isinstance(stream, int):
            return stream
        return stream.cuda_stream

    # ---- routed fused linear ----------------------------------------------
    def lora_linear_workspace_size(self, rows: int, in_features: int, out_features: int,
                                   num_experts: int, rank: int, top_k: int) -> int:
        n = self.lib.adafuse_lora_linear_workspace_size(rows, in_features, out_features,
                                                        num_experts, rank, top_k)
        if n == 0:
            raise AdafuseKernelError(
                f"invalid sizes rows={rows} in={in_features} out={out_features} "
                f"experts={num_experts} rank={rank} top_k={top_k}", ADAFUSE_ERR_INVALID_ARGUMENT)
        return n

    def lora_linear(self, x, W, A, B, expert_ids, gates, scale: float, *, bias=None, out=None,
                    workspace=None, stream=None, pdl: bool = True, gemv1: str = "auto", shrink: str = "auto",
                    exclusive_workspace: bool = False, weight_scale=None):
        """y = x W^T (+ bias) + scale * sum_j gates[:, j] * (x A[e]^T) B[e]^T, e = expert_ids[:, j].

        x [rows, in], W [out, in], A [E, rank, in], B [E, out, rank], expert_ids
        [rows, top_k] int32, gates [rows, top_k] float32; returns y [rows, out].
        W of dtype torch.float8_e4m3fn (FP8 base weights, adafuse_export.quantize) takes
        weight_scale [out] float32: x W^T becomes (x W^T) * weight_scale (W8A16; x fp16/bf16,
        in % 16 == 0).
        pdl, gemv1, shrink: adafuse_lora_options (the defaults are the library's choices).
        exclusive_workspace=True promises that no earlier kernel on the stream may still use the
        workspace's memory (a workspace kept per call site); never with workspace=None, whose
        buffer comes from the caching allocator.
        """
        if exclusive_workspace and workspace is None:
            raise AdafuseKernelError("exclusive_workspace=True needs a workspace kept per call site; got workspace=None "
                                     "(a fresh block from the caching allocator may still be in use by earlier kernels)",
                                     ADAFUSE_ERR_INVALID_ARGUMENT)
        opts = lora_options(pdl=pdl, gemv1=gemv1, shrink=shrink, exclusive_workspace=exclusive_workspace)
        return self._linear(x, W, (A, B, expert_ids, gates, scale), bias, out, workspace, stream, opts, weight_scale)

    def linear(self, x, W, *, bias=None, out=None, workspace=None, stream=None, pdl: bool = True,
               gemv1: str = "auto", weight_scale=None):
        """y = x W^T (+ bias) with no adapter, at any row count (the few-rows kernels up to 16 rows,
        the many-rows GEMM with K = in above): the dense baseline, the native backend's dense
        projections and LM head. FP8 W with weight_scale as in lora_linear."""
        return self._linear(x, W, None, bias, out, workspace, stream, lora_options(pdl=pdl, gemv1=gemv1),
                            weight_scale)

    def _linear(self, x, W, adapter, bias, out, workspace, stream, opts: LoraOptions, weight_scale=None):
        torch = _torch()
        _check_tensor("x", x)
        if x.dim() != 2:
            raise AdafuseKernelError(f"x must be 2-D [rows, in], got shape {tuple(x.shape)}",
                                     ADAFUSE_ERR_INVALID_ARGUMENT)
        dt = dtype_code(x.dtype)
        rows, in_f = x.shape
        fp8 = isinstance(W, torch.Tensor) and W.dtype == torch.float8_e4m3fn
        _check_tensor("W", W, dtype=W.dtype if fp8 else x.dtype, device=x.device)
        if W.dim() != 2 or W.shape[1] != in_f:
            raise AdafuseKernelError(f"W must be [out, {in_f}], got {tuple(W.shape)}",
                                     ADAFUSE_ERR_INVALID_ARGUMENT)
        out_f = W.shape[0]
        if fp8:
            if x.dtype not in (torch.float16, torch.bfloat16) or in_f % 16:
                raise AdafuseKernelError(
                    f"FP8 W needs x of float16 or bfloat16 and in % 16 == 0, got x {x.dtype} with in={in_f}",
                    ADAFUSE_ERR_INVALID_ARGUMENT)
            if weight_scale is None:
                raise AdafuseKernelError(f"FP8 W [{out_f}, {in_f}] needs weight_scale [{out_f}] float32",
                                         ADAFUSE_ERR_INVALID_ARGUMENT)
            _check_tensor("weight_scale", weight_scale, dtype=torch.float32, device=x.device, shape=(out_f,))
            opts.weight_dtype = WEIGHT_FP8_E4M3
            opts.weight_scale = weight_scale.data_ptr()
        elif weight_scale is not None:
            raise AdafuseKernelError(f"weight_scale is for FP8 W (torch.float8_e4m3fn); W has dtype {W.dtype}",
                                     ADAFUSE_ERR_INVALID_ARGUMENT)
        E = rank = top_k = 1  # no adapter: sizes that only size the workspace
        ptrs = [None, None, None, None]
        scale = 0.0
        if adapter is not None:
            A, B, expert_ids, gates, scale = adapter
            _check_tensor("A", A, dtype=x.dtype, device=x.device)
            if A.dim() != 3 or A.shape[2] != in_f:
                raise AdafuseKernelError(f"A must be [E, rank, {in_f}], got {tuple(A.shape)}",
                                         ADAFUSE_ERR_INVALID_ARGUMENT)
            E, rank = A.shape[0], A.shape[1]
            _check_tensor("B", B, dtype=x.dtype, device=x.device, shape=(E, out_f, rank))
            if expert_ids.dim() != 2 or expert_ids.shape[0] != rows:
                raise AdafuseKernelError(
                    f"expert_ids must be [{rows}, top_k], got {tuple(expert_ids.shape)}",
                    ADAFUSE_ERR_INVALID_ARGUMENT)
            top_k = expert_ids.shape[1]
            _check_tensor("expert_ids", expert_ids, dtype=torch.int32, device=x.device)
            _check_tensor("gates", gates, dtype=torch.float32, device=x.device, shape=(rows, top_k))
            ptrs = [A.data_ptr(), B.data_ptr(), expert_ids.data_ptr(), gates.data_ptr()]
        if bias is not None:
            _check_tensor("bias", bias, dtype=x.dtype, device=x.device, shape=(out_f,))
        if out is None:
            out = torch.empty((rows, out_f), dtype=x.dtype, device=x.device)
        else:
            _check_tensor("out", out, dtype=x.dtype, device=x.device, shape=(rows, out_f))
        need = self.lora_linear_workspace_size(rows, in_f, out_f, E, rank, top_k)
        if workspace is None:
            workspace = torch.empty(need, dtype=torch.uint8, device=x.device)
        else:
            _check_tensor("workspace", workspace, device=x.device)
            if workspace.numel() * workspace.element_size() < need:
                raise AdafuseKernelError(
                    f"workspace has {workspace.numel() * workspace.element_size()} bytes, "
                    f"needs {need}", ADAFUSE_ERR_WORKSPACE)
        st = self.lib.adafuse_lora_linear(
            dt, rows, in_f, out_f, x.data_ptr(), W.data_ptr(),
            bias.data_ptr() if bias is not None else None, ptrs[0], ptrs[1], E, rank,
            ptrs[2], ptrs[3], top_k, float(scale), out.data_ptr(),
            workspace.data_ptr(), workspace.numel() * workspace.element_size(), ctypes.byref(opts),
            self._stream_handle(stream))
        self._raise_if(st, "adafuse_lora_linear")
        return out

    # ---- fused switch ------------------------------------------------------
    @staticmethod
    def pack_sites(sites: Sequence[Dict[str, Any]]) -> bytes:
        """Pack site dicts {W, W_base (or None), A, B, scale, base_scale} of torch tensors into the
        adafuse_switch_site array (host bytes); copy it to the device before the call. W_base may be
        FP8 (torch.float8_e4m3fn) with base_scale [out] float32 per row: W gets W_base * base_scale
        + the deltas in W's dtype (float16 / bfloat16; pristine mode only)."""
        torch = _torch()
        fp8_dtype = getattr(torch, "float8_e4m3fn", None)
        arr = (SwitchSite * len(sites))()
        for k, s in enumerate(sites):
            W, A, B = s["W"], s["A"], s["B"]
            base, base_scale = s.get("W_base"), s.get("base_scale")
            fp8 = fp8_dtype is not None and isinstance(base, torch.Tensor) and base.dtype == fp8_dtype
            # the FP8 rules first (adafuse_switch_check_site's, with the site named), then the tensors
            if fp8_dtype is not None and isinstance(W, torch.Tensor) and W.dtype == fp8_dtype:
                raise AdafuseKernelError(
                    f"sites[{k}].W is FP8: the switch writes the merged weight in the model dtype; pass the FP8 "
                    "weight as W_base (pristine mode) with base_scale", ADAFUSE_ERR_INVALID_ARGUMENT)
            if fp8 and isinstance(W, torch.Tensor) and W.dtype not in (torch.float16, torch.bfloat16):
                raise AdafuseKernelError(f"sites[{k}]: an FP8 W_base needs W float16 or bfloat16, got {W.dtype}",
                                         ADAFUSE_ERR_INVALID_ARGUMENT)
            if fp8 and base_scale is None:
                raise AdafuseKernelError(f"sites[{k}]: an FP8 W_base needs base_scale [{base.shape[0]}] float32",
                                         ADAFUSE_ERR_INVALID_ARGUMENT)
            if not fp8 and base_scale is not None:
                raise AdafuseKernelError(f"sites[{k}].base_scale is for an FP8 W_base (torch.float8_e4m3fn); "
                                         f"W_base is {'None' if base is None else base.dtype}",
                                         ADAFUSE_ERR_INVALID_ARGUMENT)
            for nm, t in (("W", W), ("A", A), ("B", B)):
                _check_tensor(f"sites[{k}].{nm}", t, dtype=W.dtype, device=W.device)
            if base is not None:
                _check_tensor(f"sites[{k}].W_base", base, dtype=fp8_dtype if fp8 else W.dtype, device=W.device,
                              shape=tuple(W.shape))
            if fp8:
                _check_tensor(f"sites[{k}].base_scale", base_scale, dtype=torch.float32, device=W.device,
                              shape=(W.shape[0],))
            if W.dim() != 2 or A.dim() != 3 or B.dim() != 3 or A.shape[2] != W.shape[1] \
                    or B.shape[1] != W.shape[0] or B.shape[2] != A.shape[1] \
                    or B.shape[0] != A.shape[0]:
                raise AdafuseKernelError(
                    f"sites[{k}]: W {tuple(W.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)} "
                    "do not fit W [out, in], A [E, r, in], B [E, out, r]",
                    ADAFUSE_ERR_INVALID_ARGUMENT)
            arr[k] = SwitchSite(W.data_ptr(), base.data_ptr() if base is not None else None,
                                A.data_ptr(), B.data_ptr(), W.shape[0], W.shape[1], A.shape[1],
                                A.shape[0], float(s.get("scale", 1.0)),
                                WEIGHT_FP8_E4M3 if fp8 else WEIGHT_AS_DTYPE,
                                base_scale.data_ptr() if fp8 else None)
        return bytes(arr)

    def check_site(self, dtype, site: SwitchSite) -> None:
        """adafuse_switch_check_site: the library's own rule for one site record (host memory)."""
        self._raise_if(self.lib.adafuse_switch_check_site(dtype_code(dtype), ctypes.byref(site)),
                       "adafuse_switch_check_site")

    def sites_to_device(self, sites: Sequence[Dict[str, Any]], device=None):
        torch = _torch()
        raw = self.pack_sites(sites)
        for k, s in enumerate(sites):  # adafuse_switch skips a site it would refuse: refuse it here
            self.check_site(s["W"].dtype, SwitchSite.from_buffer_copy(raw, k * SWITCH_SITE_DTYPE_SIZE))
        dev = device if device is not None else sites[0]["W"].device
        host = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        return host.to(dev)

    def switch(self, dtype, sites_dev, num_sites: int, max_out: int, max_in: int, new_ids,
               new_gates, old_ids, old_gates, *, update_old: bool = True, stream=None,
               variant: str = "default") -> None:
        """One launch updating every site (see adafuse_switch in the header). variant other than
        "default" (SWITCH_VARIANTS) needs a library built with DIAGNOSTICS_FLAG (benchmarks only)."""
        code = _choice("variant", variant, SWITCH_VARIANTS)
        if code and self._switch_diagnostic is None:
            raise AdafuseKernelError(f"variant={variant!r} needs a benchmark build of the kernels ({DIAGNOSTICS_FLAG}); "
                                     f"{self.path} is a shipped build", ADAFUSE_ERR_INVALID_ARGUMENT)
        torch = _torch()
        dt = dtype_code(dtype)
        _check_tensor("sites", sites_dev, dtype=torch.uint8)
        if sites_dev.numel() < num_sites * SWITCH_SITE_DTYPE_SIZE:
            raise AdafuseKernelError(
                f"sites holds {sites_dev.numel()} bytes, {num_sites} sites need "
                f"{num_sites * SWITCH_SITE_DTYPE_SIZE}", ADAFUSE_ERR_INVALID_ARGUMENT)
        top_k = new_ids.numel()
        for nm, t, d in (("new_ids", new_ids, torch.int32), ("old_ids", old_ids, torch.int32),
                         ("new_gates", new_gates, torch.float32),
                         ("old_gates", old_gates, torch.float32)):
            _check_tensor(nm, t, dtype=d, device=sites_dev.device)
            if t.numel() != top_k:
                raise AdafuseKernelError(f"{nm} has {t.numel()} entries, expected top_k={top_k}",
                                         ADAFUSE_ERR_INVALID_ARGUMENT)
        args = (dt, sites_dev.data_ptr(), int(num_sites), int(max_out), int(max_in), new_ids.data_ptr(),
                new_gates.data_ptr(), old_ids.data_ptr(), old_gates.data_ptr(), int(top_k), 1 if update_old else 0,
                self._stream_handle(stream))
        if code:
            assert self._switch_diagnostic is not None
            self._raise_if(self._switch_diagnostic(code, *args), f"adafuse_switch_diagnostic({variant})")
        else:
            self._raise_if(self.lib.adafuse_switch(*args), "adafuse_switch")


    # ---- decode-step operations -------------------------------------------
    def add_rms_norm(self, h, delta, weight, eps: float, *, out=None, stream=None):
        """h [rows, hidden] (+= delta in place when delta is given) -> weight * rmsnorm(h)."""
        _check_tensor("h", h)
        if h.dim() != 2:
            raise AdafuseKernelError(f"h must be 2-D [rows, hidden], got shape {tuple(h.shape)}",
                                     ADAFUSE_ERR_INVALID_ARGUMENT)
        if delta is not None:
            _check_tensor("delta", delta, dtype=h.dtype, device=h.device, shape=tuple(h.shape))
        _check_tensor("weight", weight, dtype=h.dtype, device=h.device, shape=(h.shape[1],))
        out = self._out(out, h.shape, h)
        st = self.lib.adafuse_add_rms_norm(dtype_code(h.dtype), h.shape[0], h.shape[1], h.data_ptr(),
                                           delta.data_ptr() if delta is not None else None, weight.data_ptr(),
                                           float(eps), out.data_ptr(), self._stream_handle(stream))
        self._raise_if(st, "adafuse_add_rms_norm")
        return out

    def rope_kv_write(self, q, k, v, cos, sin, positions, k_cache, v_cache, *, seq: int, num_heads: int,
                      num_kv_heads: int, out=None, stream=None):
        """q [tokens, heads*D], k/v [tokens, kv_heads*D] (rows may be strided views of one fused
        projection output), cos/sin [tokens, D], positions [tokens] int64, caches [b, kv_heads,
        max_seq, D] -> roped q [tokens, heads*D]; writes rope(k) and v into the caches."""
        torch = _torch()
        D = k_cache.shape[-1]
        tokens = q.shape[0]
        for nm, t, width in (("q", q, num_heads * D), ("k", k, num_kv_heads * D), ("v", v, num_kv_heads * D)):
            if t.dim() != 2 or t.shape != (tokens, width) or t.stride(1) != 1 or t.dtype != q.dtype or not t.is_cuda:
                raise AdafuseKernelError(f"{nm} must be a CUDA [{tokens}, {width}] {q.dtype} tensor with unit "
                                         f"column stride, got {tuple(t.shape)} strides {t.stride()}",
                                         ADAFUSE_ERR_INVALID_ARGUMENT)
        if seq <= 0 or tokens % seq:
            raise AdafuseKernelError(f"{tokens} tokens are not a whole number of rows of seq {seq}",
                                     ADAFUSE_ERR_INVALID_ARGUMENT)
        for nm, t in (("cos", cos), ("sin", sin)):
            _check_tensor(nm, t, dtype=q.dtype, device=q.device, shape=(tokens, D))
        _check_tensor("positions", positions, dtype=torch.int64, device=q.device, shape=(tokens,))
        for nm, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            _check_tensor(nm, t, dtype=q.dtype, device=q.device)
            if t.dim() != 4 or t.shape[0] < tokens // seq or t.shape[1] != num_kv_heads:
                raise AdafuseKernelError(f"{nm} must be [>= {tokens // seq}, {num_kv_heads}, max_seq, {D}], got "
                                         f"{tuple(t.shape)}", ADAFUSE_ERR_INVALID_ARGUMENT)
        if v_cache.shape != k_cache.shape:
            raise AdafuseKernelError(f"v_cache {tuple(v_cache.shape)} differs from k_cache {tuple(k_cache.shape)}",
                                     ADAFUSE_ERR_INVALID_ARGUMENT)
        out = self._out(out, (tokens, num_heads * D), q)
        st = self.lib.adafuse_rope_kv_write(
            dtype_code(q.dtype), tokens // seq, seq, num_heads, num_kv_heads, D, q.data_ptr(), q.stride(0),
            k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), cos.data_ptr(), sin.data_ptr(),
            positions.data_ptr(), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[2],
            self._stream_handle(stream))
        self._raise_if(st, "adafuse_rope_kv_write")
        return out

    def silu_mul(self, gate, up, *, out=None, stream=None):
        """silu(gate) * up for [rows, inter] views sharing one row stride (a fused gate/up output)."""
        for nm, t in (("gate", gate), ("up", up)):
            if t.dim() != 2 or t.shape != gate.shape or t.stride() != gate.stride() or t.stride(1) != 1 \
                    or t.dtype != gate.dtype or not t.is_cuda:
                raise AdafuseKernelError(f"{nm} must be a CUDA {tuple(gate.shape)} tensor with strides "
                                         f"{gate.stride()} and unit column stride, got {tuple(t.shape)} "
                                         f"{t.stride()}", ADAFUSE_ERR_INVALID_ARGUMENT)
        out = self._out(out, gate.shape, gate)
        st = self.lib.adafuse_silu_mul(dtype_code(gate.dtype), gate.shape[0], gate.shape[1], gate.data_ptr(),
                                       up.data_ptr(), gate.stride(0), out.data_ptr(), self._stream_handle(stream))
        self._raise_if(st, "adafuse_silu_mul")
        return out

    def decode_attention_workspace_size(self, batch: int, num_heads: int, head_dim: int, max_seq: int) -> int:
        return int(self.lib.adafuse_decode_attention_workspace_size(batch, num_heads, head_dim, max_seq))

    def decode_attention(self, q, k_cache, v_cache, positions, *, num_heads: int, window: int = 0,
                         scale: float, out=None, workspace=None, stream=None):
        """q [batch, heads*D] (one token per row at positions[b]) over caches [>= batch, kv_heads,
        max_seq, D] -> [batch, heads*D]."""
        torch = _torch()
        _check_tensor("q", q)
        _, kv_heads, max_seq, D = k_cache.shape
        batch = q.shape[0]
        if q.dim() != 2 or q.shape[1] != num_heads * D:
            raise AdafuseKernelError(f"q must be [batch, {num_heads * D}], got {tuple(q.shape)}",
                                     ADAFUSE_ERR_INVALID_ARGUMENT)
        for nm, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            _check_tensor(nm, t, dtype=q.dtype, device=q.device)
            if t.shape[0] < batch or t.shape != k_cache.shape:
                raise AdafuseKernelError(f"{nm} must be [>= {batch}, kv_heads, max_seq, {D}], got {tuple(t.shape)}",
                                         ADAFUSE_ERR_INVALID_ARGUMENT)
        _check_tensor("positions", positions, dtype=torch.int64, device=q.device, shape=(batch,))
        out = self._out(out, q.shape, q)
        need = self.decode_attention_workspace_size(batch, num_heads, D, max_seq)
        if workspace is None:
            workspace = torch.empty(need, dtype=torch.uint8, device=q.device)
        st = self.lib.adafuse_decode_attention(
            dtype_code(q.dtype), batch, num_heads, kv_heads, D, max_seq, q.data_ptr(), k_cache.data_ptr(),
            v_cache.data_ptr(), positions.data_ptr(), int(window), float(scale), out.data_ptr(),
            workspace.data_ptr(), workspace.numel() * workspace.element_size(), self._stream_handle(stream))
        self._raise_if(st, "adafuse_decode_attention")
        return out

    # ---- model operations of the native backend ---------------------------
    def embed(self, ids, table, *, scale: float = 1.0, out=None, stream=None):
        """table [vocab, hidden] rows of ids [tokens] int64, times the dtype's scale -> [tokens, hidden]."""
        torch = _torch()
        _check_tensor("table", table)
        if table.dim() != 2:
            raise AdafuseKernelError(f"table must be [vocab, hidden], got {tuple(table.shape)}",
                                     ADAFUSE_ERR_INVALID_ARGUMENT)
        _check_tensor("ids", ids, dtype=torch.int64, device=table.device)
        if ids.dim() != 1:
            raise AdafuseKernelError(f"ids must be [tokens], got {tuple(ids.shape)}", ADAFUSE_ERR_INVALID_ARGUMENT)
        out = self._out(out, (ids.shape[0], table.shape[1]), table)
        st = self.lib.adafuse_embed(dtype_code(table.dtype), ids.shape[0], table.shape[1], table.shape[0],
                                    ids.data_ptr(), table.data_ptr(), float(scale), out.data_ptr(),
                                    self._stream_handle(stream))
        self._raise_if(st, "adafuse_embed")
        return out

    def norm(self, h, weight, eps: float, *, kind: str = "rms", delta=None, out=None, stream=None):
        """h [rows, hidden] (row-strided; += delta in place when given) -> the norm of `kind` (NORM_KINDS)
        into out (row-strided, may be h itself when delta is None)."""
        code = _choice("kind", kind, NORM_KINDS)
        _check_rows("h", h)
        if delta is not None:
            _check_rows("delta", delta, dtype=h.dtype, device=h.device, shape=tuple(h.shape))
        _check_tensor("weight", weight, dtype=h.dtype, device=h.device, shape=(h.shape[1],))
        if out is None:
            out = _torch().empty(tuple(h.shape), dtype=h.dtype, device=h.device)
        else:
            _check_rows("out", out, dtype=h.dtype, device=h.device, shape=tuple(h.shape))
        st = self.lib.adafuse_norm(dtype_code(h.dtype), code, h.shape[0], h.shape[1], h.data_ptr(), h.stride(0),
                                   delta.data_ptr() if delta is not None else None,
                                   delta.stride(0) if delta is not None else 0, weight.data_ptr(), float(eps),
                                   out.data_ptr(), out.stride(0), self._stream_handle(stream))
        self._raise_if(st, "adafuse_norm")
        return out

    def head_norm(self, x, weight, eps: float, *, heads: int, kind: str = "rms", stream=None):
        """Per-head norm of x [tokens, heads * head_dim] (row-strided) in place; weight [head_dim]."""
        code = _choice("kind", kind, NORM_KINDS)
        _check_rows("x", x)
        if heads <= 0 or x.shape[1] % heads:
            raise AdafuseKernelError(f"x has {x.shape[1]} columns, not a multiple of heads={heads}",
                                     ADAFUSE_ERR_INVALID_ARGUMENT)
        head_dim = x.shape[1] // heads
        _check_tensor("weight", weight, dtype=x.dtype, device=x.device, shape=(head_dim,))
        st = self.lib.adafuse_head_norm(dtype_code(x.dtype), code, x.shape[0], heads, head_dim, x.data_ptr(),
                                        x.stride(0), weight.data_ptr(), float(eps), self._stream_handle(stream))
        self._raise_if(st, "adafuse_head_norm")
        return x

    def act_mul(self, gate, up, *, act: str = "silu", out=None, stream=None):
        """act(gate) * up (ACTIVATIONS) for [rows, inter] views sharing one row stride."""
        code = _choice("act", act, ACTIVATIONS)
        _check_rows("gate", gate)
        _check_rows("up", up, dtype=gate.dtype, device=gate.device, shape=tuple(gate.shape))
        if up.stride() != gate.stride():
            raise AdafuseKernelError(f"up has strides {up.stride()}, gate {gate.stride()}: they must share one",
                                     ADAFUSE_ERR_INVALID_ARGUMENT)
        out = self._out(out, gate.shape, gate)
        st = self.lib.adafuse_act_mul(dtype_code(gate.dtype), code, gate.shape[0], gate.shape[1], gate.data_ptr(),
                                      up.data_ptr(), gate.stride(0), out.data_ptr(), self._stream_handle(stream))
        self._raise_if(st, "adafuse_act_mul")
        return out

    def rope_cache_write(self, q, k, v, inv_freq, positions, slots, k_cache, v_cache, *, num_heads: int,
                         rotary_dim: Optional[int] = None, long_inv_freq=None, use_long=None,
                         attention_factor: float = 1.0, out=None, stream=None):
        """q [tokens, heads*D], k/v [tokens, kv_heads*D] (row-strided), inv_freq [rotary_dim/2] float32,
        positions [tokens] int64, slots [tokens] int32, caches [rows, kv_heads, max_seq, D] -> roped q
        [tokens, heads*D]; writes rope(k) and v at (slots[n], positions[n]) of the caches."""
        torch = _torch()
        for nm, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            _check_tensor(nm, t, dtype=q.dtype, device=q.device)
            if t.dim() != 4 or t.shape != k_cache.shape:
                raise AdafuseKernelError(f"{nm} must be [rows, kv_heads, max_seq, D] like k_cache "
                                         f"{tuple(k_cache.shape)}, got {tuple(t.shape)}", ADAFUSE_ERR_INVALID_ARGUMENT)
        _, KV, max_seq, D = k_cache.shape
        R = D if rotary_dim is None else int(rotary_dim)
        tokens = q.shape[0]
        _check_rows("q", q, shape=(tokens, num_heads * D), device=k_cache.device, dtype=k_cache.dtype)
        _check_rows("k", k, shape=(tokens, KV * D), device=q.device, dtype=q.dtype)
        _check_rows("v", v, shape=(tokens, KV * D), device=q.device, dtype=q.dtype)
        _check_tensor("inv_freq", inv_freq, dtype=torch.float32, device=q.device, shape=(R // 2,))
        if long_inv_freq is not None:
            _check_tensor("long_inv_freq", long_inv_freq, dtype=torch.float32, device=q.device, shape=(R // 2,))
        if use_long is not None:
            _check_tensor("use_long", use_long, dtype=torch.uint8, device=q.device, shape=(tokens,))
        _check_tensor("positions", positions, dtype=torch.int64, device=q.device, shape=(tokens,))
        _check_tensor("slots", slots, dtype=torch.int32, device=q.device, shape=(tokens,))
        out = self._out(out, (tokens, num_heads * D), q)
        st = self.lib.adafuse_rope_cache_write(
            dtype_code(q.dtype), tokens, num_heads, KV, D, R, q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0),
            v.data_ptr(), v.stride(0), inv_freq.data_ptr(),
            long_inv_freq.data_ptr() if long_inv_freq is not None else None,
            use_long.data_ptr() if use_long is not None else None, float(attention_factor), slots.data_ptr(),
            positions.data_ptr(), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), max_seq,
            self._stream_handle(stream))
        self._raise_if(st, "adafuse_rope_cache_write")
        return out

    def attention_workspace_size(self, tokens: int, num_seqs: int, num_heads: int, head_dim: int,
                                 max_seq: int) -> int:
        return int(self.lib.adafuse_attention_workspace_size(tokens, num_seqs, num_heads, head_dim, max_seq))

    def attention(self, q, k_cache, v_cache, seq_starts, seq_slots, positions, *, num_heads: int,
                  max_seq_tokens: int, scale: float, window: int = 0, softcap: float = 0.0, out=None,
                  workspace=None, stream=None):
        """Causal GQA attention of the sequences [seq_starts[i], seq_starts[i+1]) of q [tokens, heads*D]
        over cache rows seq_slots[i] -> [tokens, heads*D]; max_seq_tokens 1: the split-K decode kernel."""
        torch = _torch()
        _check_tensor("q", q)
        for nm, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            _check_tensor(nm, t, dtype=q.dtype, device=q.device)
            if t.dim() != 4 or t.shape != k_cache.shape:
                raise AdafuseKernelError(f"{nm} must be [rows, kv_heads, max_seq, D] like k_cache "
                                         f"{tuple(k_cache.shape)}, got {tuple(t.shape)}", ADAFUSE_ERR_INVALID_ARGUMENT)
        _, KV, max_seq, D = k_cache.shape
        tokens = q.shape[0]
        if q.dim() != 2 or q.shape[1] != num_heads * D:
            raise AdafuseKernelError(f"q must be [tokens, {num_heads * D}], got {tuple(q.shape)}",
                                     ADAFUSE_ERR_INVALID_ARGUMENT)
        _check_tensor("seq_starts", seq_starts, dtype=torch.int32, device=q.device)
        num_seqs = seq_starts.numel() - 1
        if seq_starts.dim() != 1 or num_seqs < 0:
            raise AdafuseKernelError(f"seq_starts must be [num_seqs + 1], got {tuple(seq_starts.shape)}",
                                     ADAFUSE_ERR_INVALID_ARGUMENT)
        _check_tensor("seq_slots", seq_slots, dtype=torch.int32, device=q.device, shape=(num_seqs,))
        _check_tensor("positions", positions, dtype=torch.int64, device=q.device, shape=(tokens,))
        out = self._out(out, q.shape, q)
        nbytes = 0
        if workspace is None and max_seq_tokens == 1 and tokens > 0 and num_seqs > 0:
            workspace = torch.empty(self.attention_workspace_size(tokens, num_seqs, num_heads, D, max_seq),
                                    dtype=torch.uint8, device=q.device)
        if workspace is not None:
            _check_tensor("workspace", workspace, device=q.device)
            nbytes = workspace.numel() * workspace.element_size()
        st = self.lib.adafuse_attention(
            dtype_code(q.dtype), tokens, num_seqs, int(max_seq_tokens), num_heads, KV, D, max_seq, q.data_ptr(),
            k_cache.data_ptr(), v_cache.data_ptr(), seq_starts.data_ptr(), seq_slots.data_ptr(), positions.data_ptr(),
            int(window), float(scale), float(softcap), out.data_ptr(),
            workspace.data_ptr() if workspace is not None else None, nbytes, self._stream_handle(stream))
        self._raise_if(st, "adafuse_attention")
        return out

    def gather_rows(self, src, index, *, out=None, stream=None):
        """out[i] = src[index[i]] (src row-strided, index [rows] int32) -> [rows, cols]."""
        torch = _torch()
        _check_rows("src", src)
        _check_tensor("index", index, dtype=torch.int32, device=src.device)
        if index.dim() != 1:
            raise AdafuseKernelError(f"index must be [rows], got {tuple(index.shape)}", ADAFUSE_ERR_INVALID_ARGUMENT)
        if out is None:
            out = torch.empty((index.shape[0], src.shape[1]), dtype=src.dtype, device=src.device)
        else:
            _check_rows("out", out, dtype=src.dtype, device=src.device, shape=(index.shape[0], src.shape[1]))
        st = self.lib.adafuse_gather_rows(dtype_code(src.dtype), index.shape[0], src.shape[1], src.data_ptr(),
                                          src.stride(0), index.data_ptr(), out.data_ptr(), out.stride(0),
                                          self._stream_handle(stream))
        self._raise_if(st, "adafuse_gather_rows")
        return out

    def logits_to_float(self, x, *, softcap: float = 0.0, out=None, stream=None):
        """float32 logits [rows, vocab] of x (row-strided), soft-capped when softcap > 0."""
        torch = _torch()
        _check_rows("x", x)
        if out is None:
            out = torch.empty(tuple(x.shape), dtype=torch.float32, device=x.device)
        else:
            _check_tensor("out", out, dtype=torch.float32, device=x.device, shape=tuple(x.shape))
        st = self.lib.adafuse_logits_to_float(dtype_code(x.dtype), x.shape[0], x.shape[1], x.data_ptr(), x.stride(0),
                                              float(softcap), out.data_ptr(), self._stream_handle(stream))
        self._raise_if(st, "adafuse_logits_to_float")
        return out

    def route_topk(self, x, weight, bias, *, top_k: int, normalize: bool, stream=None):
        """Softmax router of x [rows, in] (row-strided) with weight [experts, in] float32 and bias
        [experts] float32 or None -> (ids [rows, top_k] int32, gates [rows, top_k] float32)."""
        torch = _torch()
        _check_rows("x", x)
        _check_tensor("weight", weight, dtype=torch.float32, device=x.device)
        if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
            raise AdafuseKernelError(f"weight must be [experts, {x.shape[1]}], got {tuple(weight.shape)}",
                                     ADAFUSE_ERR_INVALID_ARGUMENT)
        if bias is not None:
            _check_tensor("bias", bias, dtype=torch.float32, device=x.device, shape=(weight.shape[0],))
        ids = torch.empty((x.shape[0], top_k), dtype=torch.int32, device=x.device)
        gates = torch.empty((x.shape[0], top_k), dtype=torch.float32, device=x.device)
        st = self.lib.adafuse_route_topk(dtype_code(x.dtype), x.shape[0], x.shape[1], x.data_ptr(), x.stride(0),
                                         weight.data_ptr(), bias.data_ptr() if bias is not None else None,
                                         weight.shape[0], int(top_k), 1 if normalize else 0, ids.data_ptr(),
                                         gates.data_ptr(), self._stream_handle(stream))
        self._raise_if(st, "adafuse_route_topk")
        return ids, gates

    @staticmethod
    def _out(out, shape, like):
        if out is None:
            return _torch().empty(tuple(shape), dtype=like.dtype, device=like.device)
        _check_tensor("out", out, dtype=like.dtype, device=like.device, shape=tuple(shape))
        return out


_LOADED: Dict[str, Kernels] = {}


def load_kernels(path: Optional[Union[str, Path]] = None, archs: Optional[Sequence[str]] = None,
                 *, check_runtime: bool = True, **build_kwargs) -> Kernels:
    """Load the library from `path`, $ADAFUSE_KERNELS_LIB, a build of this checkout's sources (cached), or
    the one shipped in the wheel. A checkout builds its own so that an edited kernel is never shadowed by
    the library an earlier `pip install -e` compiled. Raises AdafuseKernelError with one line naming both
    versions when the CUDA driver is missing or older than the library's build needs (unless
    check_runtime=False)."""
    if path is None:
        path = os.environ.get("ADAFUSE_KERNELS_LIB")
    if path is None:
        from . import build
        from .. import installation

        if build.has_sources():
            path = build.build_library(archs, **build_kwargs)
        else:
            path = installation.shipped(f"lib/{installation.KERNELS_LIB}")
            if path is None:
                raise AdafuseKernelError(
                    f"this installation has no {installation.KERNELS_LIB} (built without a CUDA compiler?); "
                    "`adafuse-export doctor` tells what it holds; set ADAFUSE_KERNELS_LIB to a built library")
    key = str(Path(path).resolve())
    if key not in _LOADED:
        _LOADED[key] = Kernels(key, check_runtime=False)
    if check_runtime:
        _LOADED[key].check_runtime()
    return _LOADED[key]


def capture_graph(fn, warmups: int = 1):
    """fn() run `warmups` times on a side stream (allocator, cuBLAS handles, per-device setup: none of it may
    happen during capture), then captured in a CUDA graph: (graph, what the captured call returned). For the
    kernel tests and benchmarks that replay launches of this binding."""
    torch = _torch()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
