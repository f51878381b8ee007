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
