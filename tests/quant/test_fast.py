"""The fast FP8 GEMM's one fallback: a kernel that refuses the bias in its epilogue gets the bias added after the
cast; every other failure, out-of-memory above all, propagates instead of being taken for a missing feature."""

import pytest
import torch

from fp8mix.quant import fast
from fp8mix.quant.numerics import quantize_weight

REAL_SCALED_MM = torch._scaled_mm


def _operands():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, generator=g).to(torch.bfloat16)
    w = torch.randn(16, 32, generator=g).to(torch.bfloat16)
    bias = torch.randn(16, generator=g).to(torch.bfloat16)
    w_fp8, w_scale = quantize_weight(w, "fp8_dynamic")
    return x, w_fp8, w_scale, bias


def test_a_kernel_without_epilogue_bias_adds_it_after_the_cast(monkeypatch):
    x, w_fp8, w_scale, bias = _operands()

    def no_epilogue_bias(*args, bias=None, **kwargs):
        if bias is not None:
            raise RuntimeError("Bias is not supported when using rowwise scaling")
        return REAL_SCALED_MM(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", no_epilogue_bias)
    with fast.fast_path(True, force=True):
        fast.stats(reset=True)
        y = fast.linear_forward(x, w_fp8, bias, "fp8_dynamic", weight_scale=w_scale)
        used = fast.stats(reset=True)
        without_bias = fast.linear_forward(x, w_fp8, None, "fp8_dynamic", weight_scale=w_scale)
    assert used == {"fast": 1, "bias after cast": 1}
    assert torch.equal(y, without_bias + bias)


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB for the bias"),
    RuntimeError("CUDA error: an illegal memory access was encountered"),
], ids=["out-of-memory", "other"])
def test_other_failures_propagate(monkeypatch, error):
    x, w_fp8, w_scale, bias = _operands()

    def fails_with_bias(*args, bias=None, **kwargs):  # the retry without bias would succeed
        if bias is not None:
            raise error
        return REAL_SCALED_MM(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", fails_with_bias)
    with fast.fast_path(True, force=True), pytest.raises(type(error)) as raised:
        fast.linear_forward(x, w_fp8, bias, "fp8_dynamic", weight_scale=w_scale)
    assert raised.value is error
