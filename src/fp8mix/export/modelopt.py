"""Write a plan as a ModelOpt-format checkpoint (what NVIDIA ModelOpt's ``export_hf_checkpoint`` writes), which
vLLM loads with ``quantization="modelopt"`` (ModelOptFp8Config).

Same tensors as the compressed-tensors writer, from the same pieces (``source``, ``prepare``, ``tensors``,
``folder``, ``marker``: the same ``quantize_weight`` numbers, BF16 tensors copied bit for bit), stored the way
ModelOpt 0.47 stores them (checked against a real export of the embedded model):

* ``FP8_PER_CHANNEL_PER_TOKEN`` (fp8mix ``fp8_dynamic``): ``weight`` fp8 and ``weight_scale`` float32 [out];
  no ``input_scale`` (activations get a scale per token at run time).
* ``FP8`` (fp8mix ``fp8_static``): ``weight`` fp8, ``weight_scale`` and ``input_scale`` float32 0-d scalars.
  fp8mix shares both within fused groups (ModelOpt itself shares only the input scale, so vLLM requantizes q/k/v
  to the max weight scale at load time; with one shared scale there is nothing to requantize).

config.json gets ``quantization_config`` = {``quant_method``: "modelopt", ``quant_algo``, ``ignore``, ``producer``
(+ ``config_groups`` for FP8, as ModelOpt writes)} and hf_quant_config.json = {``producer``, ``quantization``:
{``quant_algo``, ``kv_cache_quant_algo``, ``exclude_modules``}}. vLLM reads the config.json one (key ``ignore``);
``exclude_modules`` is the key inside hf_quant_config.json only.

Exclusion matching in vLLM's modelopt.py (``is_layer_excluded``), after ``apply_vllm_mapper`` maps each entry
through the model's hf_to_vllm_mapper (and splits ``path*`` into ``path`` and ``path.*``): exact names with
fused-shard support, then SUBSTRING containment, then ``fnmatch`` wildcards. ``re:`` regexes are not understood:
the plan's ``re:.*visual.*`` would match nothing and leave the vision tower to be loaded as FP8, so it is written
in ModelOpt's own spelling, ``visual*`` (the vision tower's on-disk prefix + ``*``). Explicit unfused names
(``model.layers.N.mlp.gate_proj``) stay as they are.

``fp8_block`` is refused: it is not a ModelOpt format fp8mix writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import __version__
from ..errors import FP8MixError
from ..quant.numerics import FP8Format
from ..timing import Phases
from .folder import check_ignore, write_config, write_side_files
from .jobs import Job, write_checkpoints
from .marker import write_marker
from .prepare import plan_format, plan_kv_cache, quantize_plan
from .source import Source, source_of
from .tensors import Output

__all__ = ["FORMAT", "QUANT_ALGOS", "exclude_modules", "export_modelopt", "modelopt_configs", "prepare_modelopt"]

FORMAT = "modelopt"
QUANT_ALGOS = {FP8Format.fp8_dynamic: "FP8_PER_CHANNEL_PER_TOKEN", FP8Format.fp8_static: "FP8"}


def quant_algo(plan: dict) -> str:
    if plan_kv_cache(plan) is not None:
        raise FP8MixError(f"plan {plan.get('scheme')!r} has an FP8 KV cache, which fp8mix writes only as "
                          "compressed-tensors (kv_cache_scheme + k_scale/v_scale); export it as compressed-tensors")
    fmt = plan_format(plan)
    if fmt not in QUANT_ALGOS:
        raise FP8MixError(f"plan {plan.get('scheme')!r} is {fmt.value}, which fp8mix does not write as ModelOpt "
                          f"(ModelOpt formats: {', '.join(f.value for f in QUANT_ALGOS)}); export it as "
                          "compressed-tensors instead")
    return QUANT_ALGOS[fmt]


def exclude_modules(plan: dict, src: Source) -> list[str]:
    """The plan's ignore list in ModelOpt's wildcard spelling: the vision regex becomes ``<vision prefix>*``."""
    adapter = src.adapter
    out = []
    for entry in plan["ignore"]:
        if entry.startswith("re:"):
            if adapter.vision_path and entry == adapter.vision_ignore:
                out.append(adapter.to_disk(adapter.vision_path) + "*")
                continue
            raise FP8MixError(f"ignore entry {entry!r} is a regex; ModelOpt exclude_modules are fnmatch "
                              "wildcards and vLLM does not translate regexes: use explicit module names")
        out.append(entry)
    return out


def modelopt_configs(plan: dict, src: Source) -> tuple[dict, dict]:
    """(config.json quantization_config, hf_quant_config.json) as ModelOpt 0.47 writes them."""
    algo = quant_algo(plan)
    exclude = exclude_modules(plan, src)
    producer = {"name": "fp8mix", "version": __version__}
    hf_quant = {"producer": producer,
                "quantization": {"quant_algo": algo, "kv_cache_quant_algo": None, "exclude_modules": exclude}}
    qcfg: dict = {}
    if algo == "FP8":
        qcfg["config_groups"] = {"group_0": {
            "input_activations": {"dynamic": False, "num_bits": 8, "type": "float"},
            "weights": {"dynamic": False, "num_bits": 8, "type": "float"},
            "targets": ["Linear"]}}
    qcfg.update({"ignore": list(exclude), "quant_algo": algo, "producer": producer, "quant_method": "modelopt"})
    return qcfg, hf_quant


def _modelopt_scales(w_scale: torch.Tensor, x_scale: torch.Tensor | None, fmt: FP8Format):
    if fmt is FP8Format.fp8_dynamic:
        return w_scale.reshape(-1), None            # [out]
    return w_scale.reshape(()), x_scale.reshape(())  # 0-d scalars


def prepare_modelopt(loaded_or_model_path, plan: dict, out_dir: Path, calib_batches: list[dict] | None = None,
                     *, input_scales: dict[str, torch.Tensor] | None = None, calibration: dict | None = None,
                     progress=None) -> Job:
    """``plan`` checked and made ready to write as a ModelOpt FP8 checkpoint at ``out_dir``
    (``jobs.write_checkpoints``); arguments as export_checkpoint."""
    quant_algo(plan)  # refuse fp8_block before any work
    src = source_of(loaded_or_model_path)
    fmt = plan_format(plan)
    phases = Phases()
    with phases("prepare"):
        qcfg, hf_quant = modelopt_configs(plan, src)
        quant = quantize_plan(src, plan, calib_batches, progress, input_scales)

    def finish(tmp: Path, summary: dict) -> None:
        write_config(src, tmp, qcfg)
        check_ignore(tmp, hf_quant["quantization"]["exclude_modules"])
        (tmp / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=4) + "\n")
        write_side_files(src, tmp)
        write_marker(tmp, src, plan, FORMAT, calibration if fmt is FP8Format.fp8_static else None, summary)

    return Job(Path(out_dir), Output(Path(out_dir), quant, fmt, _modelopt_scales, phases=phases), finish)


def export_modelopt(loaded_or_model_path, plan: dict, out_dir: Path, calib_batches: list[dict] | None = None,
                    *, input_scales: dict[str, torch.Tensor] | None = None, calibration: dict | None = None,
                    progress=None) -> Path:
    """Write ``plan`` as a ModelOpt FP8 checkpoint at ``out_dir`` (replaced atomically). Arguments as
    export_checkpoint."""
    job = prepare_modelopt(loaded_or_model_path, plan, out_dir, calib_batches, input_scales=input_scales,
                           calibration=calibration, progress=progress)
    write_checkpoints(source_of(loaded_or_model_path), [job])
    return job.out_dir
