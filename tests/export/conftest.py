import json

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def export_run(tmp_path_factory):
    """A run directory with sensitivity scores (2 calibration samples: enough to rank blocks) and the catalog's
    plans."""
    from fp8mix.context import RunOptions
    from fp8mix.plan.stage import stage_plan
    from fp8mix.score.stage import stage_score

    opts = RunOptions(run=tmp_path_factory.mktemp("run"), score_overrides={"calib_samples": 2, "batch_size": 2})
    stage_score(opts)
    stage_plan(opts)
    return opts


@pytest.fixture(scope="session")
def top50_plan(export_run):
    return json.loads((export_run.run / "plans" / "fp8_autoquant_top50.json").read_text())


@pytest.fixture(scope="session")
def calib_batches(embedded):
    from fp8mix.score.batches import calibration_samples, make_batches
    from fp8mix.score.settings import AutoQuantSettings

    settings = AutoQuantSettings(calib_samples=2, batch_size=2, max_length=256)
    return make_batches(embedded.processor, calibration_samples(settings), 2, 256)


@pytest.fixture(scope="session")
def ct_top50(embedded, top50_plan, tmp_path_factory):
    from fp8mix.export import export_checkpoint

    return export_checkpoint(embedded, top50_plan, tmp_path_factory.mktemp("ckpt") / "fp8_autoquant_top50")


@pytest.fixture(scope="session")
def static_plan(top50_plan):
    """One FP8 block (its qkv, o, gate_up and down groups) in fp8_static."""
    from .export_helpers import restrict_plan

    plan = restrict_plan(top50_plan, {top50_plan["fp8_blocks"][0]})
    return {**plan, "scheme": "static_one_block", "fp8_format": "fp8_static"}


@pytest.fixture(scope="session")
def ct_static(embedded, static_plan, calib_batches, tmp_path_factory):
    from fp8mix.export import export_checkpoint

    return export_checkpoint(embedded, static_plan, tmp_path_factory.mktemp("ckpt") / "top50_static", calib_batches)
