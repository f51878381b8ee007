"""Several checkpoints from one pass over the source: the same bytes as one export at a time, each FP8 weight
quantized once, groups sized to the free disk space."""

import json

import pytest
import torch

from .export_helpers import restrict_plan


def _plans(export_run, names):
    return {n: json.loads((export_run.run / "plans" / f"{n}.json").read_text()) for n in names}


def _files(folder):
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def test_together_equals_one_at_a_time(export_run, embedded, tmp_path, monkeypatch):
    from fp8mix.export import tensors
    from fp8mix.export.compressed_tensors import export_checkpoint, prepare_checkpoint
    from fp8mix.export.jobs import write_checkpoints
    from fp8mix.export.source import source_of
    from fp8mix.quant.kv_cache import attention_modules

    names = ["fp8_autoquant_top25", "fp8_autoquant_top50", "fp8_autoquant_full_kv"]
    plans = _plans(export_run, names)
    top50 = plans["fp8_autoquant_top50"]
    plans["one_block_static"] = {**restrict_plan(top50, {top50["fp8_blocks"][0]}), "scheme": "one_block_static",
                                 "fp8_format": "fp8_static"}
    src = source_of(embedded)
    linears = [m for g in src.layout.groups for m in g.modules]
    scales = {m: torch.tensor([0.01 * (1 + i % 7)]) for i, m in enumerate(linears)}
    kv = {m: (torch.tensor([0.5]), torch.tensor([0.25])) for m in attention_modules(src.layout)}

    def kwargs(name):
        return {"input_scales": scales, "calibration": {"fixed": True}} if name == "one_block_static" else \
            {"kv_scales": kv} if name == "fp8_autoquant_full_kv" else {}

    alone = {n: export_checkpoint(embedded, p, tmp_path / "alone" / n, **kwargs(n)) for n, p in plans.items()}

    calls = []
    real = tensors.quantize_weight_chunked
    monkeypatch.setattr(tensors, "quantize_weight_chunked", lambda w, fmt, scale=None: calls.append(fmt) or
                        real(w, fmt, scale=scale))
    jobs = [prepare_checkpoint(embedded, p, tmp_path / "together" / n, **kwargs(n)) for n, p in plans.items()]
    write_checkpoints(src, jobs)
    for n in plans:
        assert _files(tmp_path / "together" / n) == _files(alone[n]), n
    dynamic = set().union(*(plans[n]["fp8_modules"] for n in names))
    assert len(calls) == len(dynamic) + len(plans["one_block_static"]["fp8_modules"])  # once per weight and scale
    assert not list((tmp_path / "together").glob(".*"))  # no staging leftovers


def test_groups_fit_the_free_space(export_run, embedded, tmp_path):
    from fp8mix.export.compressed_tensors import prepare_checkpoint
    from fp8mix.export.jobs import estimated_bytes, groups
    from fp8mix.export.source import source_of

    plans = _plans(export_run, ["fp8_autoquant_top25", "fp8_autoquant_top50", "fp8_autoquant_full"])
    src = source_of(embedded)
    jobs = [prepare_checkpoint(embedded, p, tmp_path / n) for n, p in plans.items()]
    sizes = [estimated_bytes(src, j) for j in jobs]
    assert sizes[0] > sizes[1] > sizes[2] > 0
    assert [len(g) for g in groups(src, jobs, free=10 * sum(sizes))] == [3]
    assert [len(g) for g in groups(src, jobs, free=int(1.1 * (sizes[0] + sizes[1])))] == [2, 1]
    assert [len(g) for g in groups(src, jobs, free=1)] == [1, 1, 1]  # at least one a group, however full the disk


def test_written_sizes_match_the_estimate(export_run, embedded, tmp_path):
    from fp8mix.export.compressed_tensors import prepare_checkpoint
    from fp8mix.export.jobs import estimated_bytes, write_checkpoints
    from fp8mix.export.source import source_of

    plan = _plans(export_run, ["fp8_autoquant_full"])["fp8_autoquant_full"]
    src = source_of(embedded)
    job = prepare_checkpoint(embedded, plan, tmp_path / "full")
    write_checkpoints(src, [job])
    written = sum(f.stat().st_size for f in (tmp_path / "full").glob("*.safetensors"))
    assert written == pytest.approx(estimated_bytes(src, job), rel=0.02)


def test_a_source_of_mixed_dtypes_is_laid_out_as_before(export_run, tmp_path):
    """Tensors are laid out by element size, then in the order safetensors lists the source's names (sorted), as
    the writer always did, whatever order the source's header has; a float32 tensor is cast to BF16."""
    import shutil

    from safetensors.torch import load_file, save_file

    from fp8mix.export.compressed_tensors import export_checkpoint
    from fp8mix.export.shard_writer import read_header
    from fp8mix.models.loading import EMBEDDED

    src = tmp_path / "src"
    shutil.copytree(EMBEDDED, src)
    tensors = load_file(src / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].float()   # F32 first in the source's header
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    plan = _plans(export_run, ["fp8_autoquant_top50"])["fp8_autoquant_top50"]
    out = export_checkpoint(str(src), plan, tmp_path / "out")
    header = read_header(out / "model.safetensors")
    size = {"F8_E4M3": 1, "BF16": 2, "F32": 4}
    assert list(header) == sorted(header, key=lambda n: (-size[header[n].dtype], n))
    assert [e.offset for e in header.values()] == sorted(e.offset for e in header.values())
    assert header["model.norm.weight"].dtype == "BF16"
    marker = json.loads((out / "fp8mix_plan.json").read_text())
    assert marker["tensors"]["cast_to_bf16"] == ["model.norm.weight: torch.float32"]


def test_static_weights_with_equal_scales_are_quantized_once(export_run, embedded, tmp_path, monkeypatch):
    """Two fp8_static plans calibrated alike hold a weight with the same shared scale: it is quantized once for
    both, and each checkpoint is what it is alone."""
    from fp8mix.export import tensors
    from fp8mix.export.compressed_tensors import export_checkpoint, prepare_checkpoint
    from fp8mix.export.jobs import write_checkpoints
    from fp8mix.export.source import source_of

    top50 = _plans(export_run, ["fp8_autoquant_top50"])["fp8_autoquant_top50"]
    blocks = top50["fp8_blocks"]
    plans = {"one": restrict_plan(top50, {blocks[0]}), "two": restrict_plan(top50, {blocks[0], blocks[1]})}
    plans = {n: {**p, "scheme": n, "fp8_format": "fp8_static"} for n, p in plans.items()}
    src = source_of(embedded)
    scales = {m: torch.tensor([0.01 * (1 + i % 7)]) for i, m in enumerate(m for g in src.layout.groups
                                                                          for m in g.modules)}
    alone = {n: export_checkpoint(embedded, p, tmp_path / "alone" / n, input_scales=scales) for n, p in plans.items()}
    calls = []
    real = tensors.quantize_weight_chunked
    monkeypatch.setattr(tensors, "quantize_weight_chunked", lambda w, fmt, scale=None: calls.append(fmt) or
                        real(w, fmt, scale=scale))
    jobs = [prepare_checkpoint(embedded, p, tmp_path / "together" / n, input_scales=scales) for n, p in plans.items()]
    write_checkpoints(src, jobs)
    for n in plans:
        assert _files(tmp_path / "together" / n) == _files(alone[n]), n
    assert len(calls) == len(plans["two"]["fp8_modules"])


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB file system (tmpfs; needs the right to mount: skipped without it)."""
    import subprocess

    folder = tmp_path / "small"
    folder.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(folder)], capture_output=True)
    if r.returncode:
        pytest.skip("cannot mount a small tmpfs here")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_is_one_error_line_and_leaves_nothing(export_run, small_disk):
    from fp8mix.errors import FP8MixError
    from fp8mix.export.compressed_tensors import export_checkpoint

    plan = _plans(export_run, ["fp8_autoquant_top50"])["fp8_autoquant_top50"]
    (small_disk / "ckpt").mkdir()
    (small_disk / "ckpt" / "config.json").write_text("{}")
    with pytest.raises(FP8MixError, match="no space left on the disk of"):
        export_checkpoint(None, plan, small_disk / "ckpt")
    assert [p.name for p in small_disk.iterdir()] == ["ckpt"]
    assert (small_disk / "ckpt" / "config.json").read_text() == "{}"
