"""Write a plan as a compressed-tensors checkpoint that vLLM loads (FP8 layers as CompressedTensorsW8A8Fp8,
ignored layers BF16) and transformers reloads.

The pieces are shared with the ModelOpt writer: ``source`` reads the source's safetensors files, ``prepare`` checks
the plan and fixes fp8_static's shared scales, ``tensors`` streams the shards, ``folder`` writes config.json and
the side files into a folder swapped in atomically, ``marker`` records what was written. What is this format's own:

* the scales, all float32, in compressed-tensors' own shapes (its ``weight_scale_shape()``): fp8_dynamic
  ``weight_scale`` [out, 1]; fp8_block ``weight_scale`` [ceil(out/128), ceil(in/128)]; fp8_static
  ``weight_scale`` [1] and ``input_scale`` [1], one of each per fused group, so vLLM, which runs a fused layer
  with one per-tensor scale, has nothing to requantize;
* ``config.json``'s ``quantization_config``: compressed-tensors' own serialization of one config group targeting
  ``Linear``, whose ``ignore`` is the plan's ``ignore`` list exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..quant.numerics import FP8Format, scheme_for
from .folder import check_ignore, staged_dir, write_config, write_side_files
from .marker import write_marker
from .prepare import plan_format, quantize_plan
from .source import source_of
from .tensors import write_tensors

__all__ = ["FORMAT", "export_checkpoint", "quantization_config"]

FORMAT = "compressed-tensors"


def quantization_config(plan: dict) -> dict:
    """config.json's quantization_config: compressed-tensors' serialization, with the plan's ignore list."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    fmt = plan_format(plan)
    qcfg = QuantizationConfig(config_groups={"group_0": scheme_for(fmt, targets=["Linear"])},
                              ignore=list(plan["ignore"]), format="float-quantized",
                              quantization_status=QuantizationStatus.COMPRESSED)
    # Exactly what ModelCompressor.update_config writes (compressed-tensors 0.20), without its model walk.
    return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
            "sparsity_config": {}, "transform_config": {}, **qcfg.model_dump(mode="json", exclude=["quant_method"])}


def _ct_scales(w_scale, x_scale, fmt):
    # quantize_weight's scales already have compressed-tensors' shapes: [out, 1], [1], [R, C]; input_scale [1].
    return w_scale, x_scale


def export_checkpoint(loaded_or_model_path, plan: dict, out_dir: Path, calib_batches: list[dict] | None = None,
                      *, input_scales: dict[str, torch.Tensor] | None = None, calibration: dict | None = None,
                      progress=None) -> Path:
    """Write ``plan`` as a compressed-tensors checkpoint at ``out_dir`` (replaced atomically).

    ``loaded_or_model_path``: a LoadedModel (its folder's files are the source; its model calibrates
    fp8_static), or a model folder / hub id / None (embedded). ``calib_batches``: model inputs for fp8_static's
    input scales (see score.batches.make_batches), or ``input_scales`` already calibrated for (at least) the
    plan's FP8 modules; ``calibration``: a description of the calibration data for fp8mix_plan.json.
    """
    src = source_of(loaded_or_model_path)
    fmt = plan_format(plan)
    quant = quantize_plan(src, plan, calib_batches, progress, input_scales)
    out_dir = Path(out_dir)
    with staged_dir(out_dir) as tmp:
        summary = write_tensors(src, quant, fmt, tmp, _ct_scales)
        write_config(src, tmp, quantization_config(plan))
        check_ignore(tmp, plan["ignore"])
        write_side_files(src, tmp)
        write_marker(tmp, src, plan, FORMAT, calibration if fmt is FP8Format.fp8_static else None, summary)
    return out_dir
