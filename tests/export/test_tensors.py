"""The shards streamed from the source: what a damaged source tensor does to an export."""

import shutil

import pytest
import torch

from fp8mix.errors import FP8MixError

from .export_helpers import disk_name, restrict_plan


@pytest.mark.parametrize("fmt", ["fp8_dynamic", "fp8_static"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_fp8_weight_is_refused(top50_plan, embedded, tmp_path, fmt, bad):
    """An FP8 module's weight holding inf or NaN would get a non-finite scale (vLLM would serve NaNs): one error
    line naming the tensor, nothing at the destination."""
    from safetensors.torch import load_file, save_file

    from fp8mix.export.compressed_tensors import export_checkpoint
    from fp8mix.models.loading import EMBEDDED

    plan = {**restrict_plan(top50_plan, {top50_plan["fp8_blocks"][0]}), "fp8_format": fmt}
    src = tmp_path / "src"
    shutil.copytree(EMBEDDED, src)
    tensors = load_file(src / "model.safetensors")
    key = disk_name(plan["fp8_modules"][0]) + ".weight"
    tensors[key][3, 5] = bad
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    scales = {m: torch.tensor([0.01]) for g in embedded.layout.groups for m in g.modules}
    kw = {"input_scales": scales} if fmt == "fp8_static" else {}
    with pytest.raises(FP8MixError, match=key.replace(".", r"\.")):
        export_checkpoint(str(src), plan, tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("fmt", ["fp8_dynamic", "fp8_static"])
@pytest.mark.parametrize("damage", ["truncated", "bad header", "missing"])
def test_a_damaged_source_file_is_one_error_line(top50_plan, embedded, tmp_path, damage, fmt):
    """A source shard safetensors cannot read (cut short, or a header that is not what the format says) stops the
    export with one error naming the file, nothing at the destination."""
    import os

    from fp8mix.export.compressed_tensors import export_checkpoint
    from fp8mix.models.loading import EMBEDDED

    src = tmp_path / "src"
    shutil.copytree(EMBEDDED, src)
    f = src / "model.safetensors"
    if damage == "missing":  # the index names a shard the folder does not have
        import json
        from safetensors import safe_open

        with safe_open(f, "pt") as fh:
            names = {k: f.name for k in fh.keys()}
        names["lm_head.weight"] = "model-00002-of-00002.safetensors"
        (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": names}))
    elif damage == "truncated":
        os.truncate(f, f.stat().st_size - 1000)
    else:
        raw = bytearray(f.read_bytes())
        n = int.from_bytes(raw[:8], "little")
        header = raw[8:8 + n].replace(b'"dtype"', b'"dtypX"', 1)
        f.write_bytes(bytes(raw[:8] + header + raw[8 + n:]))
    plan = {**restrict_plan(top50_plan, {top50_plan["fp8_blocks"][0]}), "fp8_format": fmt}
    scales = {m: torch.tensor([0.01]) for g in embedded.layout.groups for m in g.modules}
    kw = {"input_scales": scales} if fmt == "fp8_static" else {}
    with pytest.raises(FP8MixError, match=r"model(-00002-of-00002)?\.safetensors (is|\()"):
        export_checkpoint(str(src), plan, tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
