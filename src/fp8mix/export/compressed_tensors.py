"""Write a plan as a compressed-tensors checkpoint that vLLM loads (FP8 layers as CompressedTensorsW8A8Fp8,
ignored layers BF16) and transformers reloads.

The checkpoint is written tensor by tensor from the SOURCE safetensors files, not from a model's state dict:

* every tensor that is not an FP8 weight is copied bit for bit (cast to BF16 only if the source stored a float
  tensor in another dtype), under its legacy on-disk name (``model.layers.N…``, ``visual.…``, as transformers
  saves Qwen2.5-VL); a source in the new layout (``model.language_model.…``) is renamed to it;
* each FP8 module's ``weight`` is replaced by ``quantize_weight`` (quant/numerics.py: the same numbers fp8mix scores
  with and compressed-tensors' own compressor writes) plus its scales, all float32:
  fp8_dynamic ``weight_scale`` [out, 1]; fp8_block ``weight_scale`` [ceil(out/128), ceil(in/128)];
  fp8_static ``weight_scale`` [1] and ``input_scale`` [1], ONE of each per fused group (q/k/v, gate/up: the max
  of the members, ``quant.scales.share_group_scales``), so vLLM, which runs a fused layer with one per-tensor
  scale, has nothing to requantize.

``config.json`` is the source's with ``quantization_config`` added (compressed-tensors' own serialization of one
config group targeting ``Linear``) whose ``ignore`` is the plan's ``ignore`` list exactly. Processor, tokenizer,
chat template and generation config come from the source folder and ``save_processor``.

Everything is written into a hidden sibling folder that is renamed onto ``out_dir`` at the end: a failed export
leaves nothing (and any previous checkpoint untouched) at ``out_dir``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..errors import FP8MixError
from ..models import FamilyAdapter, ModelLayout
from ..rundir import dumps, write_json
from ..progress import no_progress
from ..quant.numerics import (
    BLOCK,
    FP8Format,
    compute_weight_scale,
    quantize_weight_chunked,
    scheme_for,
)
from ..quant.scales import calibrate_input_scales, share_group_scales
from .shard_writer import ShardWriter

__all__ = ["EXPORT_VERSION", "FORMAT", "QuantizedModule", "Source", "export_checkpoint", "plan_sha256",
           "quantize_plan", "quantization_config", "source_of", "write_tensors"]

FORMAT = "compressed-tensors"
EXPORT_VERSION = 1          # bump when the bytes an export writes change for the same plan and model
MARKER = "fp8mix_plan.json"
# Files of the source folder that belong in a servable checkpoint besides weights and config.json.
AUX_FILES = ("generation_config.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
             "processor_config.json", "video_preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
             "*.tiktoken")


# ---- the source model ----------------------------------------------------------------------------------------

@dataclass
class Source:
    """Where the weights come from, and what is known about the model."""

    path: Path
    model_id: str
    fingerprint: str
    adapter: FamilyAdapter
    layout: ModelLayout
    config: dict
    model: torch.nn.Module | None = None       # only needed to calibrate fp8_static input scales
    processor: object | None = None
    generation_config: object | None = None


def source_of(loaded_or_model_path) -> Source:
    """A Source from a LoadedModel, or from a model folder / hub id / None (embedded), read without weights (a
    Source is returned as it is)."""
    from ..models import loading

    if isinstance(loaded_or_model_path, Source):
        return loaded_or_model_path
    if isinstance(loaded_or_model_path, loading.LoadedModel):
        lm = loaded_or_model_path
        return Source(Path(lm.path), lm.model_id, lm.fingerprint, lm.adapter, lm.layout,
                      loading.read_config(Path(lm.path)), lm.model, lm.processor,
                      getattr(lm.model, "generation_config", None))
    arg = None if loaded_or_model_path is None else str(loaded_or_model_path)
    model_id, path = loading.resolve(arg)
    net, adapter = loading.build_empty(path)
    return Source(path, model_id, loading.fingerprint(path), adapter, adapter.layout(net), loading.read_config(path))


def _load_model_for_calibration(src: Source) -> None:
    from ..models import loading

    arg = None if src.model_id == loading.EMBEDDED_ID else str(src.path)
    lm = loading.load(arg, dtype=torch.bfloat16)
    src.model, src.processor = lm.model, lm.processor
    src.generation_config = getattr(lm.model, "generation_config", None)


def _memory_name(adapter: FamilyAdapter, key: str) -> str:
    """In-memory name of an on-disk tensor name, whichever of the two layouts the source was saved in."""
    for mem, _disk in adapter.disk_prefixes:
        if key == mem or key.startswith(mem + "."):
            return key
    return adapter.to_memory(key)


def _source_files(path: Path) -> list[Path]:
    from ..models import loading

    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    return loading.safetensors_files(path)


def _iter_tensors(path: Path) -> Iterator[tuple[int, int, str, Callable[[], torch.Tensor]]]:
    """(shard index, shard count, on-disk name, loader) for every tensor of the source, shard by shard."""
    from safetensors import safe_open

    files = _source_files(path)
    for i, f in enumerate(files):
        with safe_open(f, framework="pt") as fh:
            for key in fh.keys():
                yield i, len(files), key, (lambda fh=fh, key=key: fh.get_tensor(key))


def _own_weight_scales(src: Source, modules: set[str], fmt: FP8Format) -> dict[str, torch.Tensor]:
    """Each module's own weight scale, from the source weights read one at a time (fp8_static's shared scales)."""
    out = {}
    for _i, _n, key, get in _iter_tensors(src.path):
        mem = _memory_name(src.adapter, key)
        if mem.endswith(".weight") and mem[: -len(".weight")] in modules:
            out[mem[: -len(".weight")]] = compute_weight_scale(get(), fmt)
    missing = sorted(modules - set(out))
    if missing:
        raise FP8MixError(f"the source checkpoint has no weight for {', '.join(missing[:5])}; "
                          "is it the model the plan was made for?")
    return out


# ---- the plan's FP8 numbers ------------------------------------------------------------------------------------

@dataclass
class QuantizedModule:
    """What one FP8 module needs besides its weight: a fixed weight scale (fp8_static: shared in its fused group;
    None = quantize_weight computes it) and the static input scale."""

    name: str                      # in-memory module name
    group: str                     # fused group name
    weight_scale: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None
    shape: tuple[int, int] = (0, 0)


def plan_format(plan: dict) -> FP8Format:
    try:
        return FP8Format(plan.get("fp8_format", FP8Format.fp8_dynamic.value))
    except ValueError:
        raise FP8MixError(f"plan {plan.get('scheme')!r} has an unknown fp8_format {plan.get('fp8_format')!r}; "
                          f"use one of {[f.value for f in FP8Format]}") from None


def _check_plan(plan: dict, layout: ModelLayout, adapter: FamilyAdapter | None = None) -> dict[str, str]:
    """module -> group for the plan's FP8 modules; every fused group must be FP8 or BF16 as a whole."""
    for key in ("scheme", "fp8_modules", "ignore"):
        if key not in plan:
            raise FP8MixError(f"the plan has no {key!r}; rerun fp8mix plan")
    wanted = set(plan["fp8_modules"])
    group_of = {}
    for g in layout.groups:
        members = set(g.modules)
        inside = members & wanted
        if inside and inside != members:
            raise FP8MixError(f"plan {plan['scheme']!r} puts only part of the fused group {g.name} in FP8 "
                              f"({', '.join(sorted(inside))}); vLLM runs it as one layer: all or none")
        for m in inside:
            group_of[m] = g.name
    unknown = sorted(wanted - set(group_of))
    if unknown:
        raise FP8MixError(f"plan {plan['scheme']!r} names FP8 modules that are not LM linears of this model: "
                          f"{', '.join(unknown[:5])}{' …' if len(unknown) > 5 else ''}; was it planned for "
                          "another model? rerun fp8mix plan")
    _check_ignore_consistent(plan, layout, adapter)
    return group_of


def _ignored(entry_set: set[str], regexes: list, names: tuple[str, ...]) -> bool:
    return any(n in entry_set for n in names) or any(rx.fullmatch(n) for rx in regexes for n in names)


def _check_ignore_consistent(plan: dict, layout: ModelLayout, adapter: FamilyAdapter | None) -> None:
    """The ignore list must name every BF16 LM linear and no FP8 one: vLLM quantizes what is not ignored (and
    would then load a BF16 tensor into an FP8 parameter) and leaves an ignored FP8 weight unquantized."""
    if adapter is None:
        return
    import re

    entries = set(plan["ignore"])
    regexes = [re.compile(e[3:]) for e in plan["ignore"] if e.startswith("re:")]
    fp8 = set(plan["fp8_modules"])
    for g in layout.groups:
        for m in g.modules:
            ignored = _ignored(entries, regexes, (m, adapter.to_disk(m)))
            if m in fp8 and ignored:
                raise FP8MixError(f"plan {plan['scheme']!r} puts {m} in FP8 but its ignore list covers it; "
                                  "rerun fp8mix plan")
            if m not in fp8:
                for name, reader in ((adapter.to_disk(m), "vLLM"), (m, "transformers")):
                    if not _ignored(entries, regexes, (name,)):
                        raise FP8MixError(f"plan {plan['scheme']!r} keeps {m} in BF16 but its ignore list does not "
                                          f"name {name}: {reader} would quantize it; rerun fp8mix plan")


def quantize_plan(src: Source, plan: dict, calib_batches: list[dict] | None = None, progress=None,
                  input_scales: dict[str, torch.Tensor] | None = None) -> dict[str, QuantizedModule]:
    """Per FP8 module: the scales that are not a function of its own weight alone (fp8_static): from
    ``input_scales`` (quant.scales.calibrate_input_scales, e.g. of every LM linear once for several exports) or
    else calibrated here on ``calib_batches``."""
    fmt = plan_format(plan)
    group_of = _check_plan(plan, src.layout, src.adapter)
    shapes = {m: s for g in src.layout.groups for m, s in zip(g.modules, g.shapes)}
    out = {m: QuantizedModule(m, g, shape=tuple(shapes[m])) for m, g in group_of.items()}
    if fmt is FP8Format.fp8_block:
        bad = sorted(m for m, q in out.items() if q.shape[1] % BLOCK)
        if bad:
            raise FP8MixError(f"fp8_block quantizes activations in groups of {BLOCK} input features; "
                              f"{bad[0]} has {out[bad[0]].shape[1]}: use fp8_dynamic for this model")
    if fmt is not FP8Format.fp8_static or not out:
        return out
    names = sorted(out)
    if input_scales is None:
        if not calib_batches:
            raise FP8MixError(f"plan {plan['scheme']!r} is fp8_static: its input scales need calibration batches")
        if src.model is None:
            _load_model_for_calibration(src)
        input_scales = calibrate_input_scales(src.model, names, calib_batches, progress or no_progress)
    missing = [m for m in names if m not in input_scales]
    if missing:
        raise FP8MixError(f"no calibrated input scale for {missing[0]} (and {len(missing) - 1} more)")
    by_group: dict[str, list[str]] = {}
    for m in names:
        by_group.setdefault(out[m].group, []).append(m)
    w_scales = share_group_scales(by_group.values(), _own_weight_scales(src, set(names), fmt))
    x_scales = share_group_scales(by_group.values(), input_scales)
    for m in names:
        out[m].weight_scale, out[m].input_scale = w_scales[m], x_scales[m]
    return out


# ---- tensors ---------------------------------------------------------------------------------------------------

# How one writer stores the scales: (weight_scale, input_scale) from quantize_weight's float32 scale.
ScaleLayout = Callable[[torch.Tensor, torch.Tensor | None, FP8Format], tuple[torch.Tensor, torch.Tensor | None]]


def _ct_scales(w_scale, x_scale, fmt):
    # compressed-tensors' own shapes, which are weight_scale_shape(): [out, 1], [1], [R, C]; input_scale [1].
    return w_scale, x_scale


def _shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_tensors(src: Source, quant: dict[str, QuantizedModule], fmt: FP8Format, out_dir: Path,
                   scale_layout: ScaleLayout) -> dict:
    """Stream the source shards into out_dir, one output shard per source shard, one tensor in memory at a time
    (ShardWriter). Returns a summary."""
    adapter = src.adapter
    shard, writer = None, None
    weight_map, total, seen, cast = {}, 0, set(), []
    names = []

    def flush():
        nonlocal total
        if writer is None:
            return
        writer.close()
        for k in writer.entries:
            weight_map[k] = writer.path.name
        total += writer.nbytes

    for i, n, key, get in _iter_tensors(src.path):
        if i != shard:
            flush()
            shard, writer = i, ShardWriter(out_dir / _shard_names(n)[i], metadata={"format": "pt"})
        mem = _memory_name(adapter, key)
        disk = adapter.to_disk(mem)
        if disk in weight_map or disk in writer:
            raise FP8MixError(f"the source checkpoint stores {disk} twice; it is corrupt")
        module = mem[: -len(".weight")] if mem.endswith(".weight") else None
        t = get()
        if module in quant:
            q = quant[module]
            if tuple(t.shape) != q.shape:
                raise FP8MixError(f"{key} has shape {tuple(t.shape)}, the model config says {q.shape}")
            w_fp8, w_scale = quantize_weight_chunked(t, fmt, scale=q.weight_scale)
            del t
            w_scale, x_scale = scale_layout(w_scale, q.input_scale, fmt)
            base = disk[: -len(".weight")]
            writer.add(disk, w_fp8)
            writer.add(base + ".weight_scale", w_scale.to(torch.float32))
            if x_scale is not None:
                writer.add(base + ".input_scale", x_scale.to(torch.float32))
            seen.add(module)
        else:
            if t.is_floating_point() and t.dtype != torch.bfloat16:
                cast.append(f"{key}: {t.dtype}")
                t = t.to(torch.bfloat16)
            writer.add(disk, t)
        names.append(disk)
    flush()
    missing = sorted(set(quant) - seen)
    if missing:
        raise FP8MixError(f"the source checkpoint has no weight for {', '.join(missing[:5])}; "
                          "is it the model the plan was made for?")
    n_shards = len(set(weight_map.values()))
    if n_shards > 1:
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                       indent=2) + "\n")
    return {"n_tensors": len(names), "n_shards": n_shards, "bytes": total, "cast_to_bf16": cast}


# ---- config and side files -------------------------------------------------------------------------------------

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


def write_config(src: Source, out_dir: Path, qconfig: dict) -> dict:
    cfg = json.loads(json.dumps(src.config))
    cfg["dtype"] = "bfloat16"
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = "bfloat16"
    cfg["quantization_config"] = qconfig
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return cfg


def write_side_files(src: Source, out_dir: Path) -> list[str]:
    """Processor, tokenizer, chat template and generation config: the source's files, then save_processor."""
    from ..models.processor import load_processor, save_processor

    copied = []
    for pattern in AUX_FILES:
        for f in sorted(src.path.glob(pattern)):
            if f.is_file():
                shutil.copyfile(f, out_dir / f.name)
                copied.append(f.name)
    processor = src.processor if src.processor is not None else load_processor(src.path)
    save_processor(processor, out_dir)
    if not (out_dir / "generation_config.json").is_file():
        from transformers import GenerationConfig

        gen = src.generation_config
        if gen is None:
            from transformers import AutoConfig

            gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(src.path))
        gen.save_pretrained(out_dir)
    if not any((out_dir / n).is_file() for n in ("chat_template.jinja", "chat_template.json")):
        template = getattr(processor, "chat_template", None)
        if template:
            (out_dir / "chat_template.jinja").write_text(template)
    return copied


def plan_sha256(plan: dict) -> str:
    doc = {k: v for k, v in plan.items() if k != "schema"}
    return hashlib.sha256(dumps(doc).encode()).hexdigest()


def export_key(plan: dict, fmt_name: str, fingerprint: str, calibration: dict | None) -> str:
    """What decides an export's bytes: the plan, the writer, the model and (fp8_static) the calibration."""
    doc = {"plan": plan_sha256(plan), "format": fmt_name, "export_version": EXPORT_VERSION,
           "model_fingerprint": fingerprint, "calibration": calibration}
    return hashlib.sha256(dumps(doc).encode()).hexdigest()


def write_marker(out_dir: Path, src: Source, plan: dict, fmt_name: str, calibration: dict | None,
                 summary: dict) -> None:
    from .. import __version__

    write_json(out_dir / MARKER, "export", {
        "scheme": plan["scheme"], "format": fmt_name, "fp8_format": plan_format(plan).value,
        "plan_sha256": plan_sha256(plan), "export_key": export_key(plan, fmt_name, src.fingerprint, calibration),
        "export_version": EXPORT_VERSION, "fp8mix_version": __version__,
        "model": {"id": src.model_id, "fingerprint": src.fingerprint}, "calibration": calibration,
        "fp8_modules": len(plan["fp8_modules"]), "tensors": summary})


def read_marker(out_dir: Path) -> dict | None:
    from ..rundir import read_json

    try:
        return read_json(Path(out_dir) / MARKER, "export")
    except FP8MixError:
        return None


# ---- atomic folder ---------------------------------------------------------------------------------------------

def _public_modes(folder: Path) -> None:
    """mkdtemp and atomic writers create owner-only folders and files; a checkpoint gets the umask's modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)


@contextmanager
def staged_dir(out_dir: Path) -> Iterator[Path]:
    """A hidden sibling folder that replaces out_dir on success and is deleted on failure."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        yield tmp
        _public_modes(tmp)
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".old"))
            os.replace(out_dir, old / "ckpt")
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_ignore(out_dir: Path, expected: list[str], key: str = "ignore") -> None:
    """The written config.json's ignore list must be the plan's, entry for entry."""
    got = json.loads((out_dir / "config.json").read_text())["quantization_config"].get(key)
    if got != list(expected):
        raise FP8MixError(f"config.json's quantization_config.{key} differs from the plan's ignore list "
                          f"({len(got or [])} vs {len(expected)} entries); refusing to write a checkpoint vLLM "
                          "would load with the wrong layers in FP8")


# ---- entry point -----------------------------------------------------------------------------------------------

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
