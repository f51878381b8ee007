"""FP8 numerics against compressed-tensors' own compressor and the FP8 grid."""

from __future__ import annotations

import math

import pytest
import torch
from compressed_tensors.compressors import FloatQuantizationCompressor, ModelCompressor
from compressed_tensors.quantization import (
    QuantizationConfig,
    QuantizationStatus,
    apply_quantization_config,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp
from safetensors.torch import load_file, save_file

from fp8mix.quant.numerics import (
    BLOCK,
    FP8_DTYPE,
    FP8Format,
    FP8Linear,
    FP8ShapeError,
    compute_weight_scale,
    dequantize_weight,
    fake_quant_input,
    fake_quant_weight,
    fp8_linear_forward,
    quantize_input,
    quantize_weight,
    scheme_for,
    static_input_scale,
)
from fp8mix.errors import FP8MixError

FORMATS = list(FP8Format)
DTYPES = [torch.float32, torch.bfloat16]
FP8_MIN_NORMAL = 2.0**-6


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bit patterns, so -0.0 and +0.0 (and every rounding) count."""
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]
    return t.contiguous().view(view)


def assert_bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    mismatch = (bits(a) != bits(b)).sum().item()
    assert mismatch == 0, f"{mismatch} of {a.numel()} elements differ"


def ref_weight_scale(w: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    """absmax / 448 per tensor, row or 128x128 block (partial blocks at the edges), loops."""
    a = w.float().abs()
    if fmt is FP8Format.fp8_static:
        s = a.max().reshape(1) / 448.0
    elif fmt is FP8Format.fp8_dynamic:
        s = a.amax(dim=1, keepdim=True) / 448.0
    else:
        rows, cols = math.ceil(w.shape[0] / BLOCK), math.ceil(w.shape[1] / BLOCK)
        s = torch.empty(rows, cols)
        for i in range(rows):
            for j in range(cols):
                s[i, j] = a[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK].max() / 448.0
    return torch.where(s == 0, torch.finfo(torch.float32).eps, s)


class Tiny(torch.nn.Module):
    """Shapes that are and are not multiples of 128, an all-zero row and -0.0 entries."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.up = torch.nn.Linear(256, 384)
        self.mid = torch.nn.Linear(384, 200)  # out not a multiple of 128
        self.down = torch.nn.Linear(200, 300, bias=False)  # in and out not multiples
        self.head = torch.nn.Linear(300, 10)  # left unquantized via `ignore`
        with torch.no_grad():
            for lin in (self.up, self.mid, self.down, self.head):
                w = torch.randn(lin.weight.shape, generator=g)
                w *= torch.exp(2 * torch.randn(lin.weight.shape[0], 1, generator=g))  # rows of varied size
                lin.weight.copy_(w)
            self.mid.weight[5] = 0.0
            self.up.weight[3, :7] = -0.0
        self.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_roundtrip_through_compressed_tensors_compressor(fmt, dtype, tmp_path):
    model = Tiny(dtype)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = ["up", "mid", "down"]
    config = QuantizationConfig(config_groups={"group_0": scheme_for(fmt)}, ignore=["head"])
    apply_quantization_config(model, config, show_progress=False)

    # "Calibrate": float32 scales from an independent reference (the exporter does the same:
    # it replaces the weight-dtype scale parameters with float32 ones).
    for name in quantized:
        module = getattr(model, name)
        scale = ref_weight_scale(module.weight, fmt)
        assert tuple(module.weight_scale.shape) == tuple(scale.shape)
        module.weight_scale = torch.nn.Parameter(scale, requires_grad=False)
        if fmt is FP8Format.fp8_static:
            module.input_scale = torch.nn.Parameter(static_input_scale(3.5), requires_grad=False)
        module.quantization_status = QuantizationStatus.FROZEN

    compressor = ModelCompressor.from_pretrained_model(model)
    assert compressor.quantization_config.ignore == ["head"]
    assert compressor.quantization_config.format == "float-quantized"
    compressor.compress_model(model)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    on_disk = load_file(str(path))

    for name in quantized:
        w = original[f"{name}.weight"]
        w_fp8, scale = quantize_weight(w, fmt)
        assert on_disk[f"{name}.weight"].dtype == FP8_DTYPE
        assert_bitwise(on_disk[f"{name}.weight"], w_fp8)
        assert_bitwise(on_disk[f"{name}.weight_scale"], scale)
        assert not any(k.startswith(f"{name}.") and "zero_point" in k for k in on_disk)
        assert (f"{name}.input_scale" in on_disk) == (fmt is FP8Format.fp8_static)

        local = {k.split(".", 1)[1]: v for k, v in on_disk.items() if k.startswith(f"{name}.")}
        decompressed = FloatQuantizationCompressor.decompress(local, scheme_for(fmt))["weight"]
        ours = fake_quant_weight(w, fmt)
        assert ours.dtype == dtype
        assert_bitwise(decompressed.to(dtype), ours)
        assert_bitwise(dequantize_weight(w_fp8, scale, fmt, torch.float32), decompressed)
    assert on_disk["head.weight"].dtype == dtype
    assert_bitwise(on_disk["head.weight"], original["head.weight"])

    # and through the in-memory decompression path
    compressor.decompress_model(model)
    for name in quantized:
        assert_bitwise(getattr(model, name).weight.data.to(dtype), fake_quant_weight(original[f"{name}.weight"], fmt))


def test_scheme_for_is_the_preset():
    for fmt, preset in [
        (FP8Format.fp8_dynamic, "FP8_DYNAMIC"),
        (FP8Format.fp8_static, "FP8"),
        (FP8Format.fp8_block, "FP8_BLOCK"),
    ]:
        assert scheme_for(fmt) == preset_name_to_scheme(preset, ["Linear"])
        assert scheme_for(fmt.value, ["re:.*mlp.*"]).targets == ["re:.*mlp.*"]
    with pytest.raises(FP8MixError):
        scheme_for("fp8_nope")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_weight_scale_matches_compressed_tensors_dynamic_observer(fmt, dtype):
    """compressed-tensors' own reductions give the same scales (token / group strategies)."""
    w = Tiny(dtype).up.weight.detach()  # 384 x 256: whole blocks
    args = scheme_for(FP8Format.fp8_dynamic).input_activations  # token, dynamic
    if fmt is FP8Format.fp8_dynamic:
        # the token strategy reduces all but dims 0 and 1: a [1, out, in] tensor gives one per row
        expected, _ = compute_dynamic_scales_and_zp(w.float()[None], args, module=None)
        expected = expected[0]
    elif fmt is FP8Format.fp8_static:
        tensor_args = scheme_for(fmt).input_activations.model_copy(update={"dynamic": True})
        expected, _ = compute_dynamic_scales_and_zp(w.float(), tensor_args, module=None)
    else:
        blocks = w.float().unflatten(0, (-1, BLOCK)).unflatten(-1, (-1, BLOCK)).transpose(1, 2)
        group_args = scheme_for(fmt).input_activations.model_copy(update={"group_size": BLOCK * BLOCK})
        expected, _ = compute_dynamic_scales_and_zp(blocks.flatten(-2), group_args, module=None)
    assert_bitwise(compute_weight_scale(w, fmt), expected.reshape(compute_weight_scale(w, fmt).shape))


def grid_values(shape, generator) -> torch.Tensor:
    """Random finite E4M3 values (every code except NaN)."""
    codes = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x7E  # 0x7F / 0xFF are NaN
    return codes.view(FP8_DTYPE).float()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_values_on_the_fp8_grid_are_unchanged(fmt, dtype):
    g = torch.Generator().manual_seed(1)
    s = 2.0**-7
    w = grid_values((256, 384), g)
    w[:, ::BLOCK] = 448.0  # every row, block and tensor reaches +-448, so the scale is s
    w[1::2, ::BLOCK] = -448.0
    w = (w * s).to(dtype)
    w_fp8, scale = quantize_weight(w, fmt)
    assert torch.all(scale == s)
    # the compressor adds the (zero) zero point, which turns -0.0 into +0.0 and nothing else
    assert_bitwise(fake_quant_weight(w, fmt), w + 0.0)
    assert (bits(w) != bits(w + 0.0)).any()  # the grid did include -0.0

    x = (grid_values((3, 5, 384), g))
    x[..., ::BLOCK] = -448.0
    x = (x * s).to(dtype)
    static = static_input_scale(448.0 * s) if fmt is FP8Format.fp8_static else None
    assert_bitwise(fake_quant_input(x, fmt, static), x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dynamic_per_token_row_max_maps_to_448(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 9, 256, generator=g) * torch.exp(3 * torch.randn(4, 9, 1, generator=g))
    x[1, 2] = 0.0  # an all-zero token
    x[3, 4] *= 1e-4 / x[3, 4].abs().max()  # a token below vLLM's scale floor
    x = x.to(dtype)
    x_fp8, scale = quantize_input(x, FP8Format.fp8_dynamic)
    assert x_fp8.dtype == FP8_DTYPE and scale.dtype == torch.float32
    assert scale.shape == (4, 9, 1)
    q = x_fp8.float()
    absmax = x.float().abs().amax(-1)
    nonzero = absmax > 0
    # vLLM floors the scale at 1/(448*512): tokens with absmax >= 1/512 reach 448
    floor = torch.tensor(1.0 / (448.0 * 512.0))
    big = absmax >= 2.0**-9
    assert big.sum() >= 30 and (~big & nonzero).any()
    assert torch.all(q.abs().amax(-1)[big] == 448.0)
    tiny = ~big & nonzero
    assert torch.all(scale[..., 0][tiny] == floor)
    assert torch.equal(q.abs().amax(-1)[tiny], (absmax[tiny] / floor).to(FP8_DTYPE).float())
    assert torch.all(q.abs().amax(-1)[~nonzero] == 0.0)
    # the element that reaches 448 is the row's absmax, with its sign
    idx = x.float().abs().argmax(-1, keepdim=True)
    assert torch.equal(q.gather(-1, idx)[big], (448.0 * x.float().gather(-1, idx).sign())[big])
    # a 2-D input is per row too (compressed-tensors' own token emulation is per tensor there)
    q2, s2 = quantize_input(x.reshape(-1, 256), FP8Format.fp8_dynamic)
    assert_bitwise(q2, x_fp8.reshape(-1, 256))
    assert_bitwise(s2, scale.reshape(-1, 1))
    assert torch.isfinite(fake_quant_input(x, FP8Format.fp8_dynamic).float()).all()


def test_block_activation_groups_max_maps_to_448():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 384, generator=g) * torch.exp(3 * torch.randn(7, 3, 1, generator=g)).repeat_interleave(BLOCK, 1).squeeze(-1)
    x_fp8, scale = quantize_input(x, FP8Format.fp8_block)
    assert scale.shape == (7, 3, 1)
    assert torch.all(x_fp8.float().unflatten(-1, (3, BLOCK)).abs().amax(-1) == 448.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_relative_error_is_bounded(fmt, dtype):
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(300, 384, generator=g) * torch.exp(2 * torch.randn(300, 1, generator=g))).to(dtype)
    x = (torch.randn(2, 11, 384, generator=g) * torch.exp(2 * torch.randn(2, 11, 1, generator=g))).to(dtype)
    bound = 2.0**-4 + 2.0**-8  # half an E4M3 ulp for normals, plus the final rounding to dtype

    _, w_scale = quantize_weight(w, fmt)
    scale_full = (
        w_scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[: w.shape[0], : w.shape[1]]
        if fmt is FP8Format.fp8_block
        else w_scale.expand_as(w)
    )
    wf = w.float()
    normal = wf.abs() / scale_full >= FP8_MIN_NORMAL
    rel = (fake_quant_weight(w, fmt).float() - wf).abs()[normal] / wf.abs()[normal]
    assert normal.sum() > 10_000
    assert rel.max() <= bound
    assert rel.max() > 2.0**-6  # it did quantize

    static = static_input_scale(x.float().abs().amax()) if fmt is FP8Format.fp8_static else None
    x_fp8, x_scale = quantize_input(x, fmt, static)
    xf = x.float()
    if fmt is FP8Format.fp8_block:
        x_scale = x_scale.expand(*x_scale.shape[:-1], BLOCK).flatten(-2)
    normal = xf.abs() / x_scale >= FP8_MIN_NORMAL
    rel = (fake_quant_input(x, fmt, static).float() - xf).abs()[normal] / xf.abs()[normal]
    assert rel.max() <= bound
    assert rel.max() > 2.0**-6


def test_block_weight_shapes_not_multiple_of_128_follow_compressed_tensors():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(200, 300, generator=g)
    w_fp8, scale = quantize_weight(w, FP8Format.fp8_block)
    assert w_fp8.shape == (200, 300) and scale.shape == (2, 3)
    # a partial edge block is scaled by its own elements only (zero padding adds nothing)
    assert scale[1, 2] == w[128:, 256:].abs().max() / 448.0
    # same as quantizing the zero-padded weight and cropping
    padded = torch.nn.functional.pad(w, (0, 84, 0, 56))
    p_fp8, p_scale = quantize_weight(padded, FP8Format.fp8_block)
    assert_bitwise(p_scale, scale)
    assert_bitwise(p_fp8[:200, :300], w_fp8)


def test_block_activations_need_whole_groups_like_compressed_tensors():
    x = torch.randn(4, 200)
    with pytest.raises(FP8ShapeError, match="groups of 128"):
        fake_quant_input(x, FP8Format.fp8_block)
    with pytest.raises((ValueError, RuntimeError)):  # compressed-tensors refuses too
        compute_dynamic_scales_and_zp(x, scheme_for(FP8Format.fp8_block).input_activations, module=None)
    with pytest.raises(FP8ShapeError):
        fp8_linear_forward(x, torch.randn(64, 200), None, FP8Format.fp8_block)


def test_static_needs_its_scale_and_dynamic_refuses_one():
    x = torch.randn(3, 128)
    with pytest.raises(FP8MixError):
        fake_quant_input(x, FP8Format.fp8_static)
    with pytest.raises(FP8MixError):
        fake_quant_input(x, FP8Format.fp8_dynamic, static_input_scale(1.0))
    assert static_input_scale(torch.tensor([0.5, -896.0])).item() == 2.0
    assert static_input_scale(0.0).item() == torch.finfo(torch.float32).eps
    assert static_input_scale(1.0).dtype == torch.float32 and static_input_scale(1.0).shape == (1,)
    # values beyond the calibrated range saturate at +-448 * scale
    y = fake_quant_input(torch.tensor([[10.0, -10.0, 1.0]]), FP8Format.fp8_static, static_input_scale(2.0))
    assert y.tolist() == [[2.0, -2.0, 1.0]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_forward(fmt, dtype):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, 256, generator=g).to(dtype)
    lin = torch.nn.Linear(256, 96)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 256, generator=g) / 16)
        lin.bias.copy_(torch.randn(96, generator=g) / 16)
    lin.to(dtype)
    static = static_input_scale(x.float().abs().amax()) if fmt is FP8Format.fp8_static else None
    y = fp8_linear_forward(x, lin.weight, lin.bias, fmt, static)
    assert y.dtype == dtype and y.shape == (2, 5, 96)

    # reference: dequantized operands in float64
    x_fp8, x_scale = quantize_input(x, fmt, static)
    x_deq = (
        (x_fp8.double().unflatten(-1, (-1, BLOCK)) * x_scale.double()).flatten(-2)
        if fmt is FP8Format.fp8_block
        else x_fp8.double() * x_scale.double()
    )
    w_fp8, w_scale = quantize_weight(lin.weight, fmt)
    w_deq = dequantize_weight(w_fp8, w_scale, fmt, torch.float64)
    ref = x_deq @ w_deq.T + lin.bias.double()
    # float32: summation order only; bf16: one rounding of the output, two for fp8_block
    # (vLLM adds the bias after the cast there)
    tol = 1e-5 if dtype == torch.float32 else 2.0**-7 if fmt is FP8Format.fp8_block else 2.0**-8
    assert ((y.double() - ref).abs() <= tol * ref.abs().max()).all()

    module = FP8Linear.from_linear(lin, fmt, static)
    assert_bitwise(module(x), y)
    assert_bitwise(fp8_linear_forward(x, w_fp8, lin.bias, fmt, static, weight_scale=w_scale), y)
    # quantization changes the result relative to the unquantized layer, but not by much
    exact = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    rel = (y.double() - exact).norm() / exact.norm()
    assert 1e-3 < rel < 0.1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_matches_cpu(fmt):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(384, 256, generator=g).bfloat16()
    x = torch.randn(9, 256, generator=g).bfloat16()
    static = static_input_scale(x.float().abs().amax()) if fmt is FP8Format.fp8_static else None
    assert_bitwise(fake_quant_weight(w.cuda(), fmt).cpu(), fake_quant_weight(w, fmt))
    cuda_static = None if static is None else static.cuda()
    assert_bitwise(fake_quant_input(x.cuda(), fmt, cuda_static).cpu(), fake_quant_input(x, fmt, static))
    y_cuda = fp8_linear_forward(x.cuda(), w.cuda(), None, fmt, cuda_static).cpu().float()
    y_cpu = fp8_linear_forward(x, w, None, fmt, static).float()
    assert torch.allclose(y_cuda, y_cpu, rtol=2.0**-7, atol=1e-3)


def test_chunked_quantization_is_bitwise_the_whole_one():
    """Export quantizes large weights a block of rows at a time: the same FP8 bytes and scales for every format,
    with the scale computed or given, including a last block of rows that is not a multiple of 128."""
    from fp8mix.quant.numerics import compute_weight_scale, quantize_weight, quantize_weight_chunked

    torch.manual_seed(0)
    w = (torch.randn(300, 256) * torch.logspace(-2, 1, 300)[:, None]).to(torch.bfloat16)
    w[7, 3] = 40.0
    for fmt in FP8Format:
        whole, s_whole = quantize_weight(w, fmt)
        chunked, s_chunk = quantize_weight_chunked(w, fmt, chunk_elements=128 * 256)
        assert torch.equal(whole.view(torch.uint8), chunked.view(torch.uint8)), fmt
        assert torch.equal(s_whole, s_chunk), fmt
        given = compute_weight_scale(w, fmt) * 2
        a, _ = quantize_weight(w, fmt, given)
        b, _ = quantize_weight_chunked(w, fmt, given, chunk_elements=128 * 256)
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), fmt


VLLM_QUANT_FP8 = """
import sys, torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.quantization.input_quant_fp8 import QuantFP8
from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape
x, s = torch.load(sys.argv[1])
with set_current_vllm_config(VllmConfig()):
    dyn = QuantFP8(static=False, group_shape=GroupShape.PER_TOKEN, compile_native=False)
    st = QuantFP8(static=True, group_shape=GroupShape.PER_TENSOR, compile_native=False)
    torch.save((dyn.forward_native(x), st.forward_native(x, s)), sys.argv[2])
"""


def test_activations_against_vllms_own_quant_fp8(tmp_path):
    """vLLM's QuantFP8 as its CPU build runs it (forward_native): static per-tensor codes are bitwise fp8mix's;
    per-token scales are bitwise equal and the codes too, except where x / scale is halfway between two e4m3
    values up to float32 rounding: vLLM's CUDA kernel (which quantize_input follows) divides, the CPU path
    multiplies by the reciprocal, and the two quotients can fall on different sides of the midpoint (or one on
    it, rounded to even); the codes are then neighbours, one e4m3 step apart."""
    import subprocess

    from fp8mix.check.live import vllm_python

    if vllm_python() is None:
        pytest.skip("vLLM not importable and .venv-vllm missing")
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(512, 256, generator=g) * torch.exp(3 * torch.randn(512, 1, generator=g))).to(torch.bfloat16)
    x[5], x[6] = 0.0, 1e-30  # a zero token and one below the scale floor
    s = static_input_scale(x.float().abs().amax() * 0.7)  # saturates the largest tokens
    torch.save((x, s), tmp_path / "x.pt")
    subprocess.run([vllm_python(), "-c", VLLM_QUANT_FP8, str(tmp_path / "x.pt"), str(tmp_path / "q.pt")],
                   check=True, capture_output=True, timeout=300)
    (q_dyn, s_dyn), (q_st, _) = torch.load(tmp_path / "q.pt")
    assert_bitwise(quantize_input(x, FP8Format.fp8_static, s)[0], q_st)
    mine, scale = quantize_input(x, FP8Format.fp8_dynamic)
    assert_bitwise(scale, s_dyn)
    differ = bits(mine) != bits(q_dyn)
    y = x.float() / scale
    codes = torch.arange(127, dtype=torch.uint8).view(FP8_DTYPE).float()
    lo = codes[torch.searchsorted(codes, y.abs(), right=True) - 1]
    hi = codes[torch.searchsorted(codes, y.abs(), right=True).clamp(max=126)]
    near_tie = ((y.abs() - (lo + hi) / 2).abs() <= y.abs() * 2.0**-22) & (hi > lo)
    assert bool((~differ | near_tie).all())
    assert bool(((mine.float() - q_dyn.float()).abs()[differ] == (hi - lo)[differ]).all())
    assert 0 < int(differ.sum()) < x.numel() // 1000
