"""FP8 numerics, in one place: what an FP8 layer of the exported checkpoint computes when vLLM serves it.

* ``numerics`` — the formats (compressed-tensors presets), weight and activation quantization, the emulated FP8
  GEMM and ``FP8Linear``;
* ``scales`` — scales that depend on more than one tensor: fp8_static input calibration, fused-group sharing;
* ``fast`` — the same GEMM on FP8 tensor cores (``torch._scaled_mm``) where the GPU has them;
* ``weights`` — ``QuantizedWeights``: a model's LM linears quantized once, and their FP8 outputs.

Scoring, export and eval call these; no other module computes a scale.
"""
