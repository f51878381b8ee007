"""Write a plan as a compressed-tensors checkpoint that vLLM loads (FP8 layers as CompressedTensorsW8A8Fp8,
ignored layers BF16) and transformers reloads.

The pieces are shared with the ModelOpt writer: ``source`` reads the source's safetensors files, ``prepare`` checks
the plan and fixes fp8_static's shared scales, ``tensors`` streams the shards, ``folder`` writes config.json and
the side files into a folder swapped in atomically, ``jobs`` writes several checkpoints from one pass over the
source, ``marker`` records what was written. What is this format's own:

* the scales, all float32, in compressed-tensors' own shapes (its ``weight_scale_shape()``): fp8_dynamic
  ``weight_scale`` [out, 1]; fp8_block ``weight_scale`` [ceil(out/128), ceil(in/128)]; fp8_static
  ``weight_scale`` [1] and ``input_scale`` [1], one of each per fused group, so vLLM, which runs a fused layer
  with one per-tensor scale, has nothing to requantize;
* ``config.json``'s ``quantization_config``: compressed-tensors' own serialization of one config group targeting
  ``Linear``, whose ``ignore`` is the plan's ``ignore`` list exactly;
* a plan with ``kv_cache: fp8``: ``kv_cache_scheme`` (float, 8 bits, symmetric, static, ``tensor``: what vLLM's
  ``CompressedTensorsKVCacheMethod`` accepts, and what makes it run an fp8_e4m3 cache when the user leaves
  ``kv_cache_dtype`` on auto) and, per LM attention layer, ``<layer>.self_attn.k_scale`` and ``v_scale``, float32
  [1], named as compressed-tensors saves them (vLLM maps ``.k_scale`` to ``.self_attn.attn.k_scale``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import FP8MixError
from ..quant.kv_cache import KVScales, attention_modules, calibrate_kv_scales
from ..quant.numerics import FP8Format, kv_cache_args, scheme_for
from ..timing import Phases
from .folder import check_ignore, write_config, write_side_files
from .jobs import Job, write_checkpoints
from .marker import write_marker
from .prepare import plan_format, plan_kv_cache, quantize_plan
from .source import Source, load_for_calibration, source_of
from .tensors import Output

__all__ = ["FORMAT", "export_checkpoint", "kv_scale_tensors", "prepare_checkpoint", "quantization_config"]

FORMAT = "compressed-tensors"


def quantization_config(plan: dict) -> dict:
    """config.json's quantization_config: compressed-tensors' serialization, with the plan's ignore list."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    fmt = plan_format(plan)
    kv = kv_cache_args() if plan_kv_cache(plan) == "fp8" else None
    qcfg = QuantizationConfig(config_groups={"group_0": scheme_for(fmt, targets=["Linear"])}, kv_cache_scheme=kv,
                              ignore=list(plan["ignore"]), format="float-quantized",
                              quantization_status=QuantizationStatus.COMPRESSED)
    # Exactly what ModelCompressor.update_config writes (compressed-tensors 0.20), without its model walk.
    return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
            "sparsity_config": {}, "transform_config": {}, **qcfg.model_dump(mode="json", exclude=["quant_method"])}


def _ct_scales(w_scale, x_scale, fmt):
    # quantize_weight's scales already have compressed-tensors' shapes: [out, 1], [1], [R, C]; input_scale [1].
    return w_scale, x_scale


def kv_scale_tensors(src: Source, kv_scales: KVScales) -> dict[str, torch.Tensor]:
    """The KV-cache scales as stored: ``<attention module on disk>.k_scale`` / ``.v_scale``, float32 [1], for every
    LM attention layer of the model (one missing is an error)."""
    mods = attention_modules(src.layout)
    missing = [m for m in mods if m not in kv_scales]
    if missing:
        raise FP8MixError(f"no KV-cache scales for {missing[0]} ({len(missing)} of {len(mods)} attention layers)")
    out = {}
    for m in mods:
        base = src.adapter.to_disk(m)
        for kind, t in zip(("k_scale", "v_scale"), kv_scales[m]):
            t = t.detach().to("cpu", torch.float32).reshape(1)
            if not bool(torch.isfinite(t).all()) or float(t) <= 0.0:
                raise FP8MixError(f"the {kind} of {m} is {float(t)}; a KV-cache scale must be finite and positive")
            out[f"{base}.{kind}"] = t.clone()
    return out


def prepare_checkpoint(loaded_or_model_path, plan: dict, out_dir: Path, calib_batches: list[dict] | None = None,
                       *, input_scales: dict[str, torch.Tensor] | None = None, calibration: dict | None = None,
                       kv_scales: KVScales | None = None, progress=None) -> Job:
    """``plan`` checked and made ready to write as a compressed-tensors checkpoint at ``out_dir``
    (``jobs.write_checkpoints``); arguments as ``export_checkpoint``. The job's phases start with "prepare"."""
    src = source_of(loaded_or_model_path)
    fmt = plan_format(plan)
    phases = Phases()
    with phases("prepare"):
        quant = quantize_plan(src, plan, calib_batches, progress, input_scales)
        extra = {}
        if plan_kv_cache(plan) == "fp8":
            if kv_scales is None:
                if not calib_batches:
                    raise FP8MixError(f"plan {plan['scheme']!r} has an FP8 KV cache: its k/v scales need "
                                      "calibration batches")
                if src.model is None:
                    load_for_calibration(src)
                kv_scales = calibrate_kv_scales(src.model, attention_modules(src.layout), calib_batches)
            extra = kv_scale_tensors(src, kv_scales)
    calibrated = fmt is FP8Format.fp8_static or bool(extra)

    def finish(tmp: Path, summary: dict) -> None:
        write_config(src, tmp, quantization_config(plan))
        check_ignore(tmp, plan["ignore"])
        write_side_files(src, tmp)
        write_marker(tmp, src, plan, FORMAT, calibration if calibrated else None, summary)

    return Job(Path(out_dir), Output(Path(out_dir), quant, fmt, _ct_scales, extra, phases), finish)


def export_checkpoint(loaded_or_model_path, plan: dict, out_dir: Path, calib_batches: list[dict] | None = None,
                      *, input_scales: dict[str, torch.Tensor] | None = None, calibration: dict | None = None,
                      kv_scales: KVScales | None = None, progress=None) -> Path:
    """Write ``plan`` as a compressed-tensors checkpoint at ``out_dir`` (replaced atomically).

    ``loaded_or_model_path``: a LoadedModel (its folder's files are the source; its model calibrates
    fp8_static), or a model folder / hub id / None (embedded). ``calib_batches``: model inputs for fp8_static's
    input scales (see score.batches.make_batches), or ``input_scales`` already calibrated for (at least) the
    plan's FP8 modules; ``calibration``: a description of the calibration data for fp8mix_plan.json. A plan with
    ``kv_cache: fp8`` takes ``kv_scales`` (quant.kv_cache.calibrate_kv_scales) or calibrates them on
    ``calib_batches``.
    """
    job = prepare_checkpoint(loaded_or_model_path, plan, out_dir, calib_batches, input_scales=input_scales,
                             calibration=calibration, kv_scales=kv_scales, progress=progress)
    write_checkpoints(source_of(loaded_or_model_path), [job])
    return job.out_dir
