"""The study's held-out control measures KL where eval does: positions that predict text."""

import math

import pytest
import torch

from fp8mix.data import shapes
from fp8mix.errors import FP8MixError
from fp8mix.score.batches import make_batches
from fp8mix.score.study import CONTROL_FRACTIONS, control


def _doc(n_blocks):
    return {"blocks": [{"block": b, "rank": b} for b in range(n_blocks)]}


def test_control_kl_is_finite_and_ranks_choices(embedded):
    batches = make_batches(embedded.processor, [shapes.sample("eval", i) for i in range(2)], 2, 1024)
    out = control(embedded.model, embedded.layout, _doc(embedded.layout.n_blocks), batches, "fp8_dynamic")
    assert set(out) == {f"{f:.2f}" for f in CONTROL_FRACTIONS}
    for row in out.values():
        vals = [row["autoquant"], row["first_k"], row["last_k"], *row["random"]]
        assert all(math.isfinite(v) and v > 0 for v in vals)
        assert row["autoquant_blocks"] == list(range(row["blocks"]))  # rank = block index here
        assert row["autoquant"] == pytest.approx(row["first_k"], rel=1e-9)


def test_control_without_text_positions_is_an_error(embedded):
    batch = make_batches(embedded.processor, [shapes.sample("eval", 0)], 1, 1024)[0]
    batch = {**batch, "attention_mask": torch.zeros_like(batch["attention_mask"])}
    with pytest.raises(FP8MixError, match="no text position"):
        control(embedded.model, embedded.layout, _doc(embedded.layout.n_blocks), [batch], "fp8_dynamic")


def test_study_records_seconds_per_config_and_control(tmp_path):
    """run.json's study stage names each config's pass (batches and scoring apart; the base config, scored by the
    score stage, as cached) and the control's seconds."""
    from fp8mix import manifest
    from fp8mix.context import RunOptions
    from fp8mix.score.settings import AutoQuantSettings
    from fp8mix.score.stage import stage_score, stage_study
    from fp8mix.score.study import study_configs

    opts = RunOptions(run=tmp_path / "run", score_overrides={"calib_samples": 2, "batch_size": 2})
    stage_score(opts)
    stage_study(opts, n_control=2)
    rec = manifest.load(opts.run)["stages"]["study"]
    labels = [label for label, _ in study_configs(AutoQuantSettings(calib_samples=2))]
    assert set(rec["configs"]) == set(labels)
    assert rec["configs"]["base"]["cached"] is True
    for label in labels[1:]:
        c = rec["configs"][label]
        assert c["seconds"] >= c["batches_s"] + c["pass_s"] - 0.05 and c["pass_s"] > 0, (label, c)
    assert rec["configs"]["kl_div"]["method"] == "kl_div"
    assert rec["control"]["pass_s"] > 0 and rec["control"]["seconds"] <= rec["seconds"]


def test_study_of_a_one_block_model_stops_before_scoring_its_configs(tmp_path):
    """With one LM block there is no ranking to compare: rank correlations would be NaN and every control choice
    the same block. The study stops with one line after the base config, before scoring the others."""
    from fp8mix.context import RunOptions
    from fp8mix.score.stage import stage_score, stage_study
    from fp8mix.score.study import rank_stability
    from random_models import qwen2_vl_config, random_model_folder

    folder = random_model_folder(tmp_path / "model", qwen2_vl_config(num_hidden_layers=1))
    opts = RunOptions(run=tmp_path / "run", model=str(folder), score_overrides={"calib_samples": 2, "batch_size": 2})
    done = stage_score(opts)
    with pytest.raises(FP8MixError, match="1 LM block"):
        stage_study(opts, n_control=2)
    assert sorted(p.name for p in (opts.run / "scores").glob("*.json")) == sorted(p.name for p in done.values())
    doc = {"blocks": [{"block": 0, "score": 1.0, "rank": 0}]}
    with pytest.raises(FP8MixError, match="1 LM block"):
        rank_stability({"a": doc, "b": doc})


def test_study_configs_label_what_they_vary():
    from fp8mix.score.settings import AutoQuantSettings
    from fp8mix.score.study import study_configs

    for with_images in (True, False):
        base = AutoQuantSettings(with_images=with_images)
        labels = dict(study_configs(base))
        assert "base" in labels and all(s.with_images == with_images for k, s in labels.items()
                                        if k not in ("text_only", "with_images"))
        assert "text_only" in labels if with_images else "with_images" in labels
        assert not labels.get("text_only", base.model_copy(update={"with_images": False})).with_images
        assert labels.get("with_images", base.model_copy(update={"with_images": True})).with_images


def test_control_with_non_finite_kl_is_an_error(embedded):
    """A non-finite KL (a NaN or overflowing forward on the held-out data) stops the control with one line instead
    of being written into the study."""
    batches = make_batches(embedded.processor, [shapes.sample("eval", 0)], 1, 1024)
    weight = embedded.model.get_submodule("model.language_model.layers.5.mlp.down_proj").weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight[0, 0] = float("nan")
        with pytest.raises(FP8MixError, match="not finite"):
            control(embedded.model, embedded.layout, _doc(embedded.layout.n_blocks), batches, "fp8_dynamic")
    finally:
        with torch.no_grad():
            weight.copy_(saved)
