"""Fast FP8 GEMM for the AutoQuant hooks: ``torch._scaled_mm`` on the same FP8 operands as the emulation.

``numerics.fp8_linear_forward`` emulates vLLM's FP8 GEMM with an exact-product fp32 matmul (TF32 off). That is the
reference, but on a GPU an fp32 matmul runs on CUDA cores, several times slower than the BF16 forward it sits
beside. Here the same operands go through the FP8 tensor cores instead:

* the activations are quantized by ``numerics.quantize_input`` (vLLM's rules), the weights are the
  ``quantize_weight`` FP8 weights and scales the caller already holds: the fp8 operands and the float32 scales
  are bit-for-bit those of the emulation;
* fp8_dynamic: ``_scaled_mm`` with row-wise scales, ``scale_a`` [M, 1] (one per token) and ``scale_b`` [1, N]
  (one per output channel); fp8_static: per-tensor scalar scales; output BF16, bias added in the epilogue — the
  CUTLASS / ``_scaled_mm`` kernels that vLLM serves these formats with.

What differs from the emulation is only the accumulation inside the GEMM: the emulation sums exact products in
fp32, the FP8 tensor cores accumulate with less precision. Measured on an H100 (benchmarks/bench_scoring.py, 14 LM
linears of the Qwen2.5-VL-3B architecture on one batch's activations, BENCHMARKS.md): 99.04% of the outputs are
equal or one BF16 ulp apart; the rest are near-cancelling outputs, off by less than 2^-12 of sum |x_q s_x| |w_q s_w|;
dY = Y_fp8 - Y differs by 2.2% (relative Frobenius norm); the 252 per-module scores rank identically (Spearman
rho 1.0000). On the CPU (torch's CPU ``_scaled_mm``) 99.998% are within one ulp and dY differs by 0.13%.

Used on CUDA devices with FP8 tensor cores (compute capability >= 8.9), BF16 activations, fp8_dynamic or
fp8_static, and K and N multiples of 16. Everything else (CPU, fp8_block, odd shapes, FP32 activations) falls back
to ``fp8_linear_forward``. ``FP8MIX_FAST_FP8=0`` or ``with fast_path(False):`` turns it off; ``fast_path(force=True)``
also uses it on the CPU (torch's CPU ``_scaled_mm``), for tests.

q/k/v (and gate/up) read the same input tensor: the last quantized input is kept (keyed on the tensor object and
its version counter, held by a weak reference) so it is quantized once, not three times.
"""

from __future__ import annotations

import os
import weakref
from collections import Counter
from contextlib import contextmanager
from functools import lru_cache

import torch

from .numerics import FP8_DTYPE, FP8Format, fp8_linear_forward, quantize_input

__all__ = ["fast_path", "is_enabled", "linear_forward", "scaled_mm_forward", "stats", "supported"]

_FAST_FORMATS = (FP8Format.fp8_dynamic, FP8Format.fp8_static)
_state = {"enabled": os.environ.get("FP8MIX_FAST_FP8", "1") != "0", "force": False, "bias_in_epilogue": True}
_stats: Counter = Counter()
_cache: dict = {}


@contextmanager
def fast_path(enabled: bool = True, *, force: bool = False):
    """Turn the fast path on or off inside the block; ``force`` also uses it off CUDA (CPU ``_scaled_mm``)."""
    old = dict(_state)
    _state["enabled"], _state["force"] = enabled, force
    try:
        yield
    finally:
        _state.update(old)
        _cache.clear()


def is_enabled() -> bool:
    return bool(_state["enabled"])


def stats(reset: bool = False) -> dict[str, int]:
    """How many linear outputs went through ``_scaled_mm`` ("fast") and through the emulation, and why."""
    out = dict(_stats)
    if reset:
        _stats.clear()
    return out


@lru_cache(maxsize=None)
def _cuda_has_fp8(index: int | None) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 9)


def _device_ok(device: torch.device) -> bool:
    if device.type == "cuda":
        return _cuda_has_fp8(device.index)
    return bool(_state["force"])


def supported(x: torch.Tensor, w_fp8: torch.Tensor, fmt: FP8Format | str) -> str | None:
    """None if the fast path can compute this output, else the reason it cannot."""
    if not _state["enabled"]:
        return "disabled"
    if FP8Format(fmt) not in _FAST_FORMATS:
        return f"format {FP8Format(fmt).value}"
    if not _device_ok(x.device):
        return f"device {x.device.type}"
    if x.dtype != torch.bfloat16:
        return f"activations {x.dtype}"
    if w_fp8.dtype != FP8_DTYPE:
        return "weight not fp8"
    if x.shape[-1] % 16 or w_fp8.shape[0] % 16:
        return "K or N not a multiple of 16"
    return None


def _quantize_input_cached(x: torch.Tensor, fmt: FP8Format, input_scale):
    c = _cache
    ref = c.get("ref")
    if (ref is not None and ref() is x and c["version"] == x._version and c["fmt"] is fmt
            and c["scale"] is input_scale):
        _stats["input reused"] += 1
        return c["x_fp8"], c["x_scale"]
    x_fp8, x_scale = quantize_input(x, fmt, input_scale)

    def _drop(dead, cache=c):
        if cache.get("ref") is dead:
            cache.clear()

    c.clear()
    c.update(ref=weakref.ref(x, _drop), version=x._version, fmt=fmt, scale=input_scale, x_fp8=x_fp8,
             x_scale=x_scale)
    return x_fp8, x_scale


def _refuses_bias(err: RuntimeError) -> bool:
    """A torch/kernel without epilogue bias for this scaling (its check names the bias): then the bias is added
    after the cast. Anything else, out-of-memory above all, is a real failure and propagates."""
    return not isinstance(err, torch.OutOfMemoryError) and "bias" in str(err).lower()


def scaled_mm_forward(x: torch.Tensor, w_fp8: torch.Tensor, bias: torch.Tensor | None, fmt: FP8Format | str,
                      input_scale: torch.Tensor | None, *, weight_scale: torch.Tensor) -> torch.Tensor:
    """``fp8_linear_forward`` on the FP8 tensor cores (no support checks; see ``linear_forward``)."""
    fmt = FP8Format(fmt)
    in_features, out_features = x.shape[-1], w_fp8.shape[0]
    x_fp8, x_scale = _quantize_input_cached(x, fmt, input_scale)
    a = x_fp8.reshape(-1, in_features).contiguous()
    w_scale = weight_scale.to(device=x.device, dtype=torch.float32)
    if fmt is FP8Format.fp8_dynamic:
        scale_a = x_scale.reshape(-1, 1).contiguous()          # [M, 1] float32, one per token
        scale_b = w_scale.reshape(1, out_features).contiguous()  # [1, N] float32, one per output channel
    else:
        scale_a = x_scale.reshape(()).contiguous()             # per-tensor input scale
        scale_b = w_scale.reshape(()).contiguous()             # per-tensor weight scale
    b = w_fp8.t()  # [K, N] column-major, as _scaled_mm wants its second operand
    bias_bf16 = None if bias is None else bias.to(torch.bfloat16)
    if bias_bf16 is not None and _state["bias_in_epilogue"]:
        try:
            out = torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, bias=bias_bf16, out_dtype=torch.bfloat16)
        except RuntimeError as err:
            if not _refuses_bias(err):
                raise
            _state["bias_in_epilogue"] = False
            _stats["bias after cast"] += 1
            out = torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16) + bias_bf16
    else:
        out = torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)
        if bias_bf16 is not None:
            out = out + bias_bf16
    return out.reshape(*x.shape[:-1], out_features)


def linear_forward(x: torch.Tensor, w_fp8: torch.Tensor, bias: torch.Tensor | None, fmt: FP8Format | str,
                   input_scale: torch.Tensor | None = None, *, weight_scale: torch.Tensor) -> torch.Tensor:
    """The FP8 layer's output: ``_scaled_mm`` where supported (CUDA), else ``fp8_linear_forward``."""
    why_not = supported(x, w_fp8, fmt)
    if why_not is None:
        _stats["fast"] += 1
        return scaled_mm_forward(x, w_fp8, bias, fmt, input_scale, weight_scale=weight_scale)
    _stats[f"emulated ({why_not})"] += 1
    return fp8_linear_forward(x, w_fp8, bias, fmt, input_scale, weight_scale=weight_scale)
