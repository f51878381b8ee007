"""stage_export over a run directory: checkpoints/<scheme>/, skip when unchanged, manifest, formats."""

import json

import pytest

from fp8mix.errors import FP8MixError


def test_export_one_scheme_then_skip(export_run):
    from fp8mix import manifest
    from fp8mix.export.stage import stage_export

    out = stage_export(export_run, scheme="fp8_autoquant_top25")
    ckpt = out["fp8_autoquant_top25"]
    assert ckpt == export_run.run / "checkpoints" / "fp8_autoquant_top25"
    marker = json.loads((ckpt / "fp8mix_plan.json").read_text())
    assert marker["schema"] == "fp8mix/export/v1" and marker["scheme"] == "fp8_autoquant_top25"
    rec = manifest.load(export_run.run)["stages"]["export"]
    assert rec["checkpoints"]["fp8_autoquant_top25"]["skipped"] is False
    assert "load_s" not in rec  # fp8_dynamic: the weights stream from the files, the model is never loaded
    mtime = (ckpt / "model.safetensors").stat().st_mtime_ns

    stage_export(export_run, scheme="fp8_autoquant_top25")          # unchanged plan: kept
    assert (ckpt / "model.safetensors").stat().st_mtime_ns == mtime
    rec = manifest.load(export_run.run)["stages"]["export"]
    assert rec["checkpoints"]["fp8_autoquant_top25"]["skipped"] is True

    plan_file = export_run.run / "plans" / "fp8_autoquant_top25.json"   # a changed plan is re-exported
    plan = json.loads(plan_file.read_text())
    plan_file.write_text(json.dumps({**plan, "rationale": plan["rationale"] + " (edited)"}))
    try:
        stage_export(export_run, scheme="fp8_autoquant_top25")
        assert (ckpt / "model.safetensors").stat().st_mtime_ns != mtime
    finally:
        plan_file.write_text(json.dumps(plan))


def test_unknown_scheme_and_format(export_run):
    from fp8mix.export.stage import stage_export

    with pytest.raises(FP8MixError, match="no plan for scheme"):
        stage_export(export_run, scheme="nope")
    with pytest.raises(FP8MixError, match="unknown export format"):
        stage_export(export_run, fmt="gguf")


def test_modelopt_refuses_block_plans(export_run, tmp_path):
    import shutil
    from dataclasses import replace

    from fp8mix.export.stage import stage_export

    run = tmp_path / "run"
    shutil.copytree(export_run.run, run, ignore=shutil.ignore_patterns("checkpoints"))
    plan_file = run / "plans" / "fp8_autoquant_top25.json"
    plan_file.write_text(json.dumps({**json.loads(plan_file.read_text()), "fp8_format": "fp8_block"}))
    with pytest.raises(FP8MixError, match="fp8_block"):
        stage_export(replace(export_run, run=run), scheme="fp8_autoquant_top25", fmt="modelopt")
    assert not (run / "checkpoints").exists()


def test_static_plan_is_calibrated_with_the_schemes_settings(export_run, tmp_path):
    import shutil
    from dataclasses import replace

    from fp8mix.export.stage import stage_export
    from fp8mix.rundir import read_json

    run = tmp_path / "run"
    shutil.copytree(export_run.run, run, ignore=shutil.ignore_patterns("checkpoints"))
    plan_file = run / "plans" / "fp8_autoquant_top25.json"
    plan_file.write_text(json.dumps({**json.loads(plan_file.read_text()), "fp8_format": "fp8_static"}))
    out = stage_export(replace(export_run, run=run), scheme="fp8_autoquant_top25")["fp8_autoquant_top25"]
    marker = read_json(out / "fp8mix_plan.json", "export")
    assert marker["fp8_format"] == "fp8_static" and marker["calibration"]["calib_samples"] == 2
    from .export_helpers import read_safetensors

    tensors = read_safetensors(out)
    assert sum(k.endswith(".input_scale") for k in tensors) == len(json.loads(plan_file.read_text())["fp8_modules"])
