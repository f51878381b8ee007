import json

import pytest
from PIL import Image

from fp8mix.context import RunOptions
from fp8mix.errors import FP8MixError
from fp8mix.evaluate.heldout import eval_set
from fp8mix.models.loading import EMBEDDED
from fp8mix.models.processor import load_processor


@pytest.mark.parametrize("with_images", [True, False])
def test_a_sample_both_calibrated_on_and_held_out_is_refused(tmp_path, with_images):
    """Data that holds the same sample twice can put one copy in calibration and one in the held-out set: eval
    refuses it, also when calibration is text only (its samples then lack the images the held-out ones have)."""
    Image.new("RGB", (56, 56), "red").save(tmp_path / "a.png")
    row = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]},
                        {"role": "assistant", "content": "Red."}], "images": ["a.png"]}
    (tmp_path / "d.jsonl").write_text((json.dumps(row) + "\n") * 8)
    opts = RunOptions(run=tmp_path / "run", score_overrides={"data": str(tmp_path / "d.jsonl"), "calib_samples": 8,
                                                             **({} if with_images else {"with_images": False})})
    with pytest.raises(FP8MixError, match="shares samples with the calibration set"):
        eval_set(opts, 4, load_processor(EMBEDDED))


def test_text_only_calibration_on_repetitive_data_is_not_overlap(tmp_path):
    """The embedded shapes task repeats its questions and answers over different images: a text-only calibration
    shares texts with held-out samples but no sample."""
    opts = RunOptions(run=tmp_path / "run", score_overrides={"data": "embedded", "calib_samples": 64,
                                                             "with_images": False})
    assert len(eval_set(opts, 16, load_processor(EMBEDDED)).samples) == 16
