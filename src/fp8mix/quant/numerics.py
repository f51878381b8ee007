"""FP8 (E4M3) numerics: the one place that says what a quantized layer computes.

Weights are quantized with compressed-tensors' own ``calculate_qparams``,
``quantize`` and ``dequantize``, driven by the QuantizationArgs of the preset
scheme that the exporter also writes into the checkpoint (``scheme_for``), so
``fake_quant_weight(w, fmt)`` is bit-for-bit what compressed-tensors decompresses
from the exported ``weight`` (float8_e4m3fn) + ``weight_scale`` (float32).

Scales, as stored on disk (all float32):

* ``fp8_dynamic`` (preset FP8_DYNAMIC): ``weight_scale`` [out, 1] = absmax(row) / 448;
  no ``input_scale``; activations get one scale per token at run time.
* ``fp8_static`` (preset FP8): ``weight_scale`` [1] = absmax(W) / 448;
  ``input_scale`` [1] = calibrated absmax(x) / 448 (``static_input_scale``); a fused group
  (q/k/v, gate/up) shares the largest of each (``scales.share_group_scales``).
* ``fp8_block`` (preset FP8_BLOCK): ``weight_scale`` [ceil(out/128), ceil(in/128)] =
  absmax(block) / 448, the weight zero-padded to whole blocks as compressed-tensors
  does; no ``input_scale``; activations get one scale per token and 128 features.

A zero weight scale becomes ``finfo(float32).eps`` (compressed-tensors' rule for
float32 scales); scales are computed from the weight upcast to float32.

Activation scales are not in the checkpoint: vLLM computes them while serving,
so ``quantize_input`` follows vLLM's kernels (float32 absmax, scale floors,
division vs. reciprocal) rather than compressed-tensors' HF-side emulation, which
computes the scale in the activation dtype, and, for 2-D inputs with the
``token`` strategy, uses one scale for the whole tensor.

FP8 KV cache (compressed-tensors ``kv_cache_scheme``: float, 8 bits, symmetric,
static, ``tensor`` strategy): one float32 ``k_scale`` [1] and ``v_scale`` [1] per
attention layer = absmax / 448 of the post-RoPE keys / the values over the
calibration data (``kv_cache_scale``). vLLM writes the cache as
``fp8(float32(x) / scale)`` (saturating, round to nearest even) and reads it as
``float32(fp8) * scale`` (``quantize_kv``, ``fake_quant_kv``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from enum import Enum

import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationScheme,
    QuantizationStrategy,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
from compressed_tensors.quantization.utils import (
    calculate_qparams,
    maybe_pad_tensor_for_block_quant,
)

from fp8mix.errors import FP8MixError

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "BLOCK",
    "FP8Format",
    "FP8ShapeError",
    "FP8Linear",
    "scheme_for",
    "weight_scale_shape",
    "compute_weight_scale",
    "quantize_weight",
    "dequantize_weight",
    "fake_quant_weight",
    "static_input_scale",
    "quantize_input",
    "fake_quant_input",
    "fp8_linear_forward",
    "kv_cache_args",
    "kv_cache_scale",
    "quantize_kv",
    "fake_quant_kv",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0, as compressed-tensors and vLLM use
BLOCK = 128  # FP8_BLOCK: 128x128 weight blocks, 1x128 activation groups

# vLLM's floor on per-token activation scales: min_scaling_factor<float8_e4m3fn>
# (csrc/quantization/w8a8/fp8/common.cu, and QuantFP8.forward_native).
_MIN_TOKEN_SCALE = 1.0 / (FP8_MAX * 512.0)
# vLLM's floor on the absmax of a 128-feature group: eps=1e-10 in
# per_token_group_quant_fp8 (CUDA and Triton kernels).
_GROUP_ABSMAX_EPS = 1e-10


class FP8Format(str, Enum):
    """How a Linear layer is quantized; each value is one compressed-tensors preset."""

    fp8_dynamic = "fp8_dynamic"  # per-channel weight, dynamic per-token activations
    fp8_static = "fp8_static"  # per-tensor weight, static per-tensor activations
    fp8_block = "fp8_block"  # 128x128 weight blocks, dynamic 1x128 activation groups


_PRESETS = {
    FP8Format.fp8_dynamic: "FP8_DYNAMIC",
    FP8Format.fp8_static: "FP8",
    FP8Format.fp8_block: "FP8_BLOCK",
}


class FP8ShapeError(FP8MixError, ValueError):
    """A tensor shape that a format cannot quantize the way vLLM would serve it."""


def _fmt(fmt: FP8Format | str) -> FP8Format:
    try:
        return FP8Format(fmt)
    except ValueError:
        raise FP8MixError(
            f"unknown FP8 format {fmt!r}; use one of {[f.value for f in FP8Format]}"
        ) from None


def scheme_for(fmt: FP8Format | str, targets: list[str] | None = None) -> QuantizationScheme:
    """The compressed-tensors preset scheme for ``fmt`` (targets default to ["Linear"]).

    For a mixed-precision checkpoint give each group explicit targets (layer names
    or "re:" patterns): several groups that all target "Linear" are ambiguous.
    """
    return preset_name_to_scheme(_PRESETS[_fmt(fmt)], list(targets or ["Linear"]))


def _weight_args(fmt: FP8Format) -> QuantizationArgs:
    return scheme_for(fmt).weights


def _check_weight(weight: torch.Tensor) -> None:
    if weight.ndim != 2:
        raise FP8ShapeError(f"expected a 2-D Linear weight [out, in], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point() or weight.dtype == FP8_DTYPE:
        raise FP8ShapeError(f"expected a high-precision float weight, got {weight.dtype}")


def weight_scale_shape(weight_shape: tuple[int, int] | torch.Size, fmt: FP8Format | str) -> tuple[int, ...]:
    """Shape of ``weight_scale`` as compressed-tensors initializes and stores it."""
    fmt = _fmt(fmt)
    out_features, in_features = weight_shape
    if fmt is FP8Format.fp8_static:
        return (1,)
    if fmt is FP8Format.fp8_dynamic:
        return (out_features, 1)
    return (math.ceil(out_features / BLOCK), math.ceil(in_features / BLOCK))


def compute_weight_scale(weight: torch.Tensor, fmt: FP8Format | str) -> torch.Tensor:
    """The min-max observer's scale: absmax / 448 per tensor, row or 128x128 block.

    Reduces the float32 weight the way llm-compressor's min-max observer groups
    it, then calls compressed-tensors' ``calculate_qparams`` (which widens the
    range to include 0, divides by 448 and replaces zero scales by the float32 eps).
    """
    fmt = _fmt(fmt)
    _check_weight(weight)
    args = _weight_args(fmt)
    # min and max pick elements, so reducing in the weight's own dtype and widening the result to float32 gives
    # the float32 reduction's numbers without a float32 copy of the whole weight
    w = weight.detach()
    if args.strategy == QuantizationStrategy.TENSOR:
        lo, hi = torch.aminmax(w)
    elif args.strategy == QuantizationStrategy.CHANNEL:
        lo = torch.amin(w, dim=1, keepdim=True)
        hi = torch.amax(w, dim=1, keepdim=True)
    else:  # BLOCK: zero padding cannot move the range, which calculate_qparams widens to 0
        bh, bw = args.block_structure
        w = maybe_pad_tensor_for_block_quant(w, (bh, bw))
        blocks = w.unflatten(0, (-1, bh)).unflatten(-1, (-1, bw))  # [R, bh, C, bw]
        lo = torch.amin(blocks, dim=(1, 3))
        hi = torch.amax(blocks, dim=(1, 3))
    scale, _ = calculate_qparams(lo.to(torch.float32), hi.to(torch.float32), args)
    return scale.reshape(weight_scale_shape(weight.shape, fmt))


def quantize_weight(
    weight: torch.Tensor, fmt: FP8Format | str, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a Linear weight as the compressed-tensors compressor writes it.

    Returns ``(weight_fp8, weight_scale)``: float8_e4m3fn [out, in] and float32 of
    ``weight_scale_shape``. Pass ``scale`` to reuse a scale (e.g. one per-tensor scale
    shared by q/k/v, so vLLM need not requantize the fused layer).
    """
    fmt = _fmt(fmt)
    _check_weight(weight)
    args = _weight_args(fmt)
    if scale is None:
        scale = compute_weight_scale(weight, fmt)
    else:
        expected = weight_scale_shape(weight.shape, fmt)
        scale = scale.to(device=weight.device, dtype=torch.float32).reshape(expected)
    # The compressor quantizes with the (symmetric, all-zero) zero point that
    # apply_quantization_config attaches; adding it turns -0.0 into +0.0, so do the same.
    zero_point = torch.zeros(scale.shape, dtype=args.zp_dtype, device=weight.device)
    w_fp8 = quantize(x=weight.detach(), scale=scale, zero_point=zero_point, args=args, dtype=FP8_DTYPE)
    return w_fp8, scale


CHUNK_ELEMENTS = 1 << 20


def quantize_weight_chunked(weight: torch.Tensor, fmt: FP8Format | str, scale: torch.Tensor | None = None,
                            chunk_elements: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_weight`` a block of rows at a time: the same bytes (every scale covers whole rows: the tensor, a
    row, or 128-row blocks, and the rounding is elementwise), with the float32 temporaries of one block of about
    ``chunk_elements`` instead of the whole weight. For exporting large weights with bounded memory."""
    fmt = _fmt(fmt)
    _check_weight(weight)
    out_f, in_f = weight.shape
    rows = max(BLOCK, chunk_elements // max(in_f, 1) // BLOCK * BLOCK)
    if rows >= out_f:
        return quantize_weight(weight, fmt, scale)
    if scale is None:
        scale = compute_weight_scale(weight, fmt)
    scale = scale.to(device=weight.device, dtype=torch.float32).reshape(weight_scale_shape(weight.shape, fmt))
    strategy = _weight_args(fmt).strategy
    out = torch.empty(weight.shape, dtype=FP8_DTYPE, device=weight.device)
    for r0 in range(0, out_f, rows):
        r1 = min(r0 + rows, out_f)
        if strategy == QuantizationStrategy.TENSOR:
            part = scale
        elif strategy == QuantizationStrategy.CHANNEL:
            part = scale[r0:r1]
        else:
            part = scale[r0 // BLOCK: -(-r1 // BLOCK)]
        out[r0:r1] = quantize_weight(weight[r0:r1], fmt, part)[0]
    return out, scale


def dequantize_weight(
    weight_fp8: torch.Tensor,
    scale: torch.Tensor,
    fmt: FP8Format | str,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """What compressed-tensors decompresses: fp8 -> float32, times the scale, cast to dtype."""
    fmt = _fmt(fmt)
    if weight_fp8.dtype != FP8_DTYPE:
        raise FP8ShapeError(f"expected a float8_e4m3fn weight, got {weight_fp8.dtype}")
    scale = scale.to(torch.float32)
    # compressed-tensors' dequantize returns the scale's dtype (float32) for these
    # strategies whatever dtype says; the cast is what loading into `dtype` does.
    deq = dequantize(x_q=weight_fp8, scale=scale, zero_point=None, args=_weight_args(fmt), dtype=dtype)
    return deq.to(dtype)


def fake_quant_weight(weight: torch.Tensor, fmt: FP8Format | str) -> torch.Tensor:
    """dequantize_weight(quantize_weight(weight)) in the weight's own dtype."""
    w_fp8, scale = quantize_weight(weight, fmt)
    return dequantize_weight(w_fp8, scale, fmt, dtype=weight.dtype)


def static_input_scale(absmax: torch.Tensor | float) -> torch.Tensor:
    """``input_scale`` for fp8_static from a calibrated absmax: float32 [1] = absmax / 448.

    Same rule as compressed-tensors' ``calculate_qparams`` on the static_minmax
    observer's range (an all-zero calibration gives the float32 eps).
    """
    a = torch.as_tensor(absmax, dtype=torch.float32).detach().abs().amax().reshape(1)
    scale, _ = calculate_qparams(-a, a, scheme_for(FP8Format.fp8_static).input_activations)
    return scale.reshape(1)


def quantize_input(
    x: torch.Tensor, fmt: FP8Format | str, static_scale: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations [..., features] as vLLM does; returns (x_fp8, float32 scale).

    The scale broadcasts against x: [..., 1] per token, [1] per tensor, and
    [..., features/128, 1] against ``x.unflatten(-1, (-1, 128))`` for block.

    * fp8_dynamic: scale = max(absmax(row) / 448, 1/(448*512)); q = x / scale.
    * fp8_static: q = x * (1 / input_scale).
    * fp8_block: scale = max(absmax(group), 1e-10) / 448; q = x / scale. The
      feature count must be a multiple of 128 (vLLM's CUDA kernel and
      compressed-tensors both refuse otherwise).
    All in float32, clamped to +-448, cast with round-to-nearest-even.
    """
    fmt = _fmt(fmt)
    if fmt is FP8Format.fp8_static:
        if static_scale is None:
            raise FP8MixError("fp8_static needs the calibrated input scale (static_input_scale)")
    elif static_scale is not None:
        raise FP8MixError(f"{fmt.value} computes activation scales at run time; pass no static_scale")
    if x.ndim < 1 or x.shape[-1] == 0:
        raise FP8ShapeError(f"expected activations [..., features], got shape {tuple(x.shape)}")
    xf = x.detach().to(torch.float32)

    if fmt is FP8Format.fp8_static:
        scale = torch.as_tensor(static_scale, dtype=torch.float32, device=x.device).reshape(1)
        q = xf * scale.reciprocal()
    elif fmt is FP8Format.fp8_dynamic:
        absmax = xf.abs().amax(dim=-1, keepdim=True)
        scale = (absmax / _fp8_max(x.device)).clamp(min=_MIN_TOKEN_SCALE)
        q = xf / scale
    else:
        features = x.shape[-1]
        if features % BLOCK:
            raise FP8ShapeError(
                f"fp8_block quantizes activations in groups of {BLOCK} features, but this layer "
                f"has {features} input features; use another format for it"
            )
        xf = xf.unflatten(-1, (features // BLOCK, BLOCK))
        absmax = xf.abs().amax(dim=-1, keepdim=True)
        scale = absmax.clamp(min=_GROUP_ABSMAX_EPS) / _fp8_max(x.device)
        q = (xf / scale).flatten(-2)
    x_fp8 = q.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x_fp8, scale


def _fp8_max(device: torch.device) -> torch.Tensor:
    # A tensor divisor, not a Python number: on CUDA, torch turns division by a CPU
    # scalar into multiplication by its reciprocal, which is 1 ulp off the true
    # quotient (vLLM's kernels divide) and would make CPU and CUDA results differ.
    return torch.tensor(FP8_MAX, dtype=torch.float32, device=device)


def _dequant_input(x_fp8: torch.Tensor, scale: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    xf = x_fp8.to(torch.float32)
    if fmt is FP8Format.fp8_block:
        return (xf.unflatten(-1, (-1, BLOCK)) * scale).flatten(-2)
    return xf * scale


def fake_quant_input(
    x: torch.Tensor, fmt: FP8Format | str, static_scale: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Activations quantized as vLLM would and dequantized, in x's dtype."""
    fmt = _fmt(fmt)
    x_fp8, scale = quantize_input(x, fmt, static_scale)
    return _dequant_input(x_fp8, scale, fmt).to(x.dtype)


@contextmanager
def _exact_fp32_matmul():
    """Keep fp32 matmuls in full fp32 (no TF32) while emulating."""
    cuda_matmul = torch.backends.cuda.matmul
    old_tf32 = cuda_matmul.allow_tf32
    old_precision = torch.get_float32_matmul_precision()
    try:
        cuda_matmul.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        yield
    finally:
        torch.set_float32_matmul_precision(old_precision)
        cuda_matmul.allow_tf32 = old_tf32


def fp8_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    fmt: FP8Format | str,
    input_scale: torch.Tensor | float | None = None,
    *,
    weight_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Output of a Linear layer served as FP8 by vLLM, in x's dtype.

    ``weight`` is the high-precision weight (quantized here with ``quantize_weight``)
    or an already quantized float8_e4m3fn weight together with ``weight_scale``.
    ``input_scale`` is the calibrated scale for fp8_static (see static_input_scale).

    What matches vLLM: the FP8 weight and scales (they are the checkpoint's), the
    activation quantization (quantize_input follows vLLM's kernels), the output
    dtype, and where the bias goes: per-token/per-tensor GEMMs (CUTLASS or
    torch._scaled_mm) take fp8 x fp8 products, accumulate in fp32 and apply
    scale_x * scale_w + bias in fp32 in the epilogue before one cast, which is
    what is done here; the block GEMM applies the scales per 128-wide K slice and
    vLLM adds the bias after the cast to the output dtype.
    What is emulation: the fp32 matmul runs on torch's (CPU/cuBLAS) kernel,
    whose summation order differs from vLLM's, and for fp8_block the scales are
    folded into the operands before one fp32 matmul, deq(x_q) @ deq(w_q).T,
    instead of a scaled partial sum per K slice; both differ only by fp32 rounding.
    """
    fmt = _fmt(fmt)
    if weight.dtype == FP8_DTYPE:
        if weight_scale is None:
            raise FP8MixError("a float8_e4m3fn weight needs its weight_scale")
        w_fp8 = weight
        w_scale = weight_scale.to(device=weight.device, dtype=torch.float32).reshape(
            weight_scale_shape(weight.shape, fmt)
        )
    else:
        w_fp8, w_scale = quantize_weight(weight, fmt, scale=weight_scale)
    if x.shape[-1] != w_fp8.shape[1]:
        raise FP8ShapeError(f"input has {x.shape[-1]} features, weight expects {w_fp8.shape[1]}")

    x_fp8, x_scale = quantize_input(x, fmt, input_scale)
    lead = x.shape[:-1]
    with _exact_fp32_matmul():
        if fmt is FP8Format.fp8_block:
            x_deq = _dequant_input(x_fp8, x_scale, fmt).reshape(-1, x.shape[-1])
            w_deq = dequantize_weight(w_fp8, w_scale, fmt, dtype=torch.float32)
            out = (x_deq @ w_deq.T).to(x.dtype)
            if bias is not None:
                out = out + bias.to(x.dtype)
        else:
            # fp8 values are exact in fp32 (and TF32), so this is the exact-product,
            # fp32-accumulated GEMM followed by vLLM's epilogue.
            acc = x_fp8.reshape(-1, x.shape[-1]).to(torch.float32) @ w_fp8.to(torch.float32).T
            xs = x_scale.reshape(-1, 1) if fmt is FP8Format.fp8_dynamic else x_scale.reshape(1, 1)
            ws = w_scale.reshape(1, -1)  # [1, out] (per channel) or [1, 1] (per tensor)
            out = acc * (xs * ws)
            if bias is not None:
                out = out + bias.to(torch.float32)
            out = out.to(x.dtype)
    return out.reshape(*lead, w_fp8.shape[0])


class FP8Linear(torch.nn.Module):
    """A Linear layer whose forward is ``fp8_linear_forward``; the weight is quantized once."""

    def __init__(
        self,
        weight_fp8: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        fmt: FP8Format | str,
        input_scale: torch.Tensor | None = None,
    ):
        super().__init__()
        self.fmt = _fmt(fmt)
        if self.fmt is FP8Format.fp8_static and input_scale is None:
            raise FP8MixError("fp8_static needs the calibrated input scale (static_input_scale)")
        self.register_buffer("weight", weight_fp8)
        self.register_buffer("weight_scale", weight_scale.to(torch.float32))
        self.register_buffer("bias", bias)
        self.register_buffer(
            "input_scale", None if input_scale is None else input_scale.to(torch.float32).reshape(1)
        )
        self.out_features, self.in_features = weight_fp8.shape

    @classmethod
    def from_linear(
        cls, linear: torch.nn.Linear, fmt: FP8Format | str, input_scale: torch.Tensor | None = None
    ) -> "FP8Linear":
        w_fp8, scale = quantize_weight(linear.weight, fmt)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(w_fp8, scale, bias, fmt, input_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear_forward(
            x, self.weight, self.bias, self.fmt, self.input_scale, weight_scale=self.weight_scale
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt.value}"


# ---- FP8 KV cache ------------------------------------------------------------------------------------------------

def kv_cache_args() -> QuantizationArgs:
    """compressed-tensors' ``kv_cache_scheme`` that vLLM accepts: float, 8 bits, symmetric, static, per tensor."""
    return QuantizationArgs(num_bits=8, type="float", strategy="tensor", symmetric=True, dynamic=False)


def kv_cache_scale(absmax: torch.Tensor | float) -> torch.Tensor:
    """``k_scale`` / ``v_scale`` from a calibrated absmax: float32 [1] = absmax / 448 (compressed-tensors'
    ``calculate_qparams`` on the ``kv_cache_scheme`` args; an all-zero calibration gives the float32 eps)."""
    a = torch.as_tensor(absmax, dtype=torch.float32).detach().abs().amax().reshape(1)
    scale, _ = calculate_qparams(-a, a, kv_cache_args())
    return scale.reshape(1)


def quantize_kv(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """What vLLM writes into an fp8_e4m3 KV cache: fp8(float32(x) / scale), saturated to +-448, round to nearest
    even (``scaled_convert`` in vLLM's cache kernels). ``scale`` is the layer's per-tensor k_scale or v_scale."""
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(())
    if not bool(torch.isfinite(s)) or float(s) <= 0.0:
        raise FP8MixError(f"a KV-cache scale must be finite and positive, got {float(s)}")
    return (x.detach().to(torch.float32) / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fake_quant_kv(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Keys or values as vLLM reads them back from an fp8 KV cache: float32(fp8) * scale, in x's dtype."""
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(())
    return (quantize_kv(x, s).to(torch.float32) * s).to(x.dtype)
