"""Degenerate inputs stop scoring with one clear line and leave no scores, sensitivity.json or plan behind."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli_runs import fp8mix, one_line_error
from PIL import Image

from fp8mix.data import real, shapes
from fp8mix.data.samples import ChatSample, assistant_turn, encode, fit_image, fit_samples, user_turn
from fp8mix.errors import FP8MixError
from fp8mix.models.loading import EMBEDDED
from fp8mix.score.sensitivity import check_scores


def nothing_written(run) -> None:
    assert not (run / "sensitivity.json").exists()
    assert not list(run.glob("scores/*.json")) and not list(run.glob("plans/*.json"))


def model_copy(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(EMBEDDED, folder)
    return folder


def test_template_without_the_assistant_header_stops_scoring(tmp_path):
    """A chat template that renders the assistant turn differently leaves no token supervised: the loss and every
    gradient score would be zero. It must stop, naming the header fp8mix looked for."""
    folder = model_copy(tmp_path)
    tpl = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").write_text(tpl.replace("<|im_start|>{{ message['role'] }}\n",
                                                            "<|im_start|>{{ message['role'] }}:\n"))
    run = tmp_path / "run"
    r = fp8mix("score", "--out", str(run), "--model", str(folder), "--calib-samples", "4", timeout=600)
    line = one_line_error(r, after_progress=True)
    assert "<|im_start|>assistant\\n" in line and "4 of 4 sample(s) have no supervised token" in line
    nothing_written(run)


def test_unsupervised_sample_in_a_batch_is_counted(embedded):
    ok = shapes.sample("calib", 0)
    no_reply = ChatSample([user_turn("Describe this photo.", 1)], ok.images)
    with pytest.raises(FP8MixError, match="1 of 2 sample"):
        encode(embedded.processor, [ok, no_reply])


def test_nan_weights_stop_scoring(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = model_copy(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    name = next(n for n in tensors if n.endswith("layers.3.mlp.down_proj.weight"))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    run = tmp_path / "run"
    r = fp8mix("score", "--out", str(run), "--model", str(folder), "--calib-samples", "4", timeout=600)
    line = one_line_error(r, after_progress=True)
    assert "not finite" in line
    nothing_written(run)


def test_score_checks():
    check_scores({"a": 1e-6, "b": 0.0})
    with pytest.raises(FP8MixError, match="all 2 module scores are zero"):
        check_scores({"a": 0.0, "b": 0.0})
    with pytest.raises(FP8MixError, match="1 of 2 module scores are not finite"):
        check_scores({"a": 1.0, "b": float("inf")})


def test_fit_image_keeps_aspect_and_pixel_budget():
    img = Image.new("RGB", (1920, 1080))
    small = fit_image(img, 401408)
    assert small.size[0] * small.size[1] <= 401408 and abs(small.size[0] / small.size[1] - 16 / 9) < 0.01
    assert fit_image(small, 401408) is small


def _photo_jsonl(tmp_path, n: int, long_reply_every: int = 0):
    """n samples on 1080p photos (a real photo scaled up), some with long replies."""
    photo = real.photo_sample("calib", 0).images[0].resize((1920, 1080))
    photo.save(tmp_path / "photo.png")
    with open(tmp_path / "data.jsonl", "w") as f:
        for i in range(n):
            reply = "A photo. " * (200 if long_reply_every and i % long_reply_every == 0 else 2)
            row = {"messages": [user_turn("Describe this photo.", 1), assistant_turn(reply.strip())],
                   "images": ["photo.png"]}
            f.write(json.dumps(row) + "\n")
    return tmp_path / "data.jsonl"


def test_1080p_photos_are_fitted_and_overlong_samples_dropped(tmp_path):
    """A 1080p photo would be ~2.6 k image tokens at Qwen's default pixel limit: it is scaled down; a sample still
    longer than --max-length is dropped and counted, never cut or turned into a traceback."""
    data = _photo_jsonl(tmp_path, 8, long_reply_every=2)
    run = tmp_path / "run"
    r = fp8mix("score", "--out", str(run), "--data", str(data), "--calib-samples", "6", "--max-length", "256",
               timeout=600)
    assert r.returncode == 0, r.stderr
    cal = json.loads((run / "sensitivity.json").read_text())["calibration"]
    assert cal["n_dropped_too_long"] >= 1 and cal["n_samples"] + cal["n_dropped_too_long"] == 6
    assert cal["n_supervised_tokens"] > 0


def test_nothing_fits_is_one_line(tmp_path):
    data = _photo_jsonl(tmp_path, 8)
    run = tmp_path / "run"
    r = fp8mix("score", "--out", str(run), "--data", str(data), "--max-length", "24", timeout=600)
    line = one_line_error(r, after_progress=True)
    assert "--max-length 24" in line and "--max-pixels" in line
    nothing_written(run)


def test_fit_samples_counts_drops(embedded):
    samples = [real.text_sample("calib", i) for i in range(4)]
    kept, dropped = fit_samples(embedded.processor, samples, max_length=16)
    assert (len(kept), dropped) == (0, 4)
    kept, dropped = fit_samples(embedded.processor, samples, max_length=100_000)
    assert (len(kept), dropped) == (4, 0)


@pytest.mark.parametrize("turns", [1, 2])
def test_a_reply_starting_with_a_line_break_is_one_clear_error(embedded, turns):
    """Qwen's tokenizer merges a reply's leading line break with the assistant header's own ("\n\n" is one token):
    that reply would go unsupervised (the only one: no supervised token; an earlier turn of several: silently).
    The embedded model's small vocabulary has no such merge, so a copy of its processor is given one."""
    import copy

    proc = copy.deepcopy(embedded.processor)
    proc.tokenizer.add_tokens(["\n\n"])
    ok = shapes.sample("calib", 0)
    first = [user_turn("Describe this photo.", 1), assistant_turn("\nA red circle.")]
    later = [user_turn("And its colour?"), assistant_turn("Red.")] if turns == 2 else []
    bad = ChatSample(first + later, ok.images, source="test")
    with pytest.raises(FP8MixError, match="starts with whitespace"):
        encode(proc, [ok, bad])
    fine = ChatSample([first[0], assistant_turn("A red circle."), *later], ok.images, source="test")
    assert (encode(proc, [ok, fine])["labels"][1] != -100).any()
