import json

import pytest
from PIL import Image

from fp8mix.data import sources
from fp8mix.errors import FP8MixError


def _png(path, color=(200, 10, 10)):
    Image.new("RGB", (60, 40), color).save(path)


def test_embedded_is_deterministic_and_splits_are_disjoint():
    a = sources.embedded("calib", 40, seed=0)
    b = sources.embedded("calib", 40, seed=0)
    assert [s.fingerprint() for s in a] == [s.fingerprint() for s in b]
    other_seed = sources.embedded("calib", 40, seed=1)
    assert not {s.fingerprint() for s in a} & {s.fingerprint() for s in other_seed}
    ev = sources.embedded("eval", 200)
    sources.assert_disjoint(a + other_seed, ev)
    kinds = {s.source for s in a}
    assert kinds == {"shapes", "photos", "text"}
    assert all(s.images for s in a if s.source != "text")


def test_eval_photos_and_topics_are_held_out():
    from fp8mix.data import real

    assert not set(real.EVAL_PHOTOS) & set(real.CALIB_PHOTOS)
    assert not set(real.text_paragraphs("eval")) & set(real.text_paragraphs("calib"))


def test_jsonl_roundtrip_and_split(tmp_path):
    _png(tmp_path / "a.png")
    rows = []
    for i in range(8):
        rows.append({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"q{i}"}]},
                                  {"role": "assistant", "content": [{"type": "text", "text": f"a{i}"}]}],
                     "images": ["a.png"]})
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    calib = sources.load(str(f), "calib", 100)
    ev = sources.load(str(f), "eval", 100)
    assert len(calib) == 6 and len(ev) == 2
    sources.assert_disjoint(calib, ev)
    assert ev[0].answer.startswith("a") and ev[0].images[0].size == (60, 40)
    assert sorted(s.answer for s in calib + ev) == sorted(f"a{i}" for i in range(8))


@pytest.mark.parametrize("line, message", [
    ('{"messages": [', "d.jsonl:2: not valid JSON"),
    ('{"images": []}', "d.jsonl:2: missing 'messages'"),
    ('{"messages": [{"role": "user", "content": [{"type": "image"}]}], "images": ["nope.png"]}',
     "d.jsonl:2: image .*nope.png not found"),
    ('{"messages": [{"role": "user", "content": [{"type": "image"}]}], "images": []}',
     "d.jsonl:2: 1 image item"),
    ('{"messages": [{"role": "user", "content": [{"type": "image"}]}], "images": ["bad.png"]}',
     "d.jsonl:2: cannot read image .*bad.png"),
    ('{"messages": [{"role": "user", "content": [{"type": "image"}]}], "images": [3]}',
     "d.jsonl:2: 'images' must be a list of image file paths"),
    ('{"messages": [{"role": "user", "content": 5}]}', "d.jsonl:2: a message's content must be a string or a list"),
    ('{"messages": [{"role": "user", "content": ["hi"]}]}', "d.jsonl:2: a message's content must be"),
    ('{"messages": [{"role": "user", "content": [{"text": "hi"}]}]}', "d.jsonl:2: a message's content must be"),
    ('{"messages": [{"role": "assistant", "content": null}]}', "d.jsonl:2: a message's content must be"),
])
def test_jsonl_bad_lines_name_file_and_line(tmp_path, line, message):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    good = '{"messages": [{"role": "user", "content": "hi"}]}'
    f = tmp_path / "d.jsonl"
    f.write_text(good + "\n" + line + "\n")
    with pytest.raises(FP8MixError, match=message):
        sources.jsonl(f)


def test_image_folder_with_sidecars_and_table(tmp_path):
    _png(tmp_path / "one.png")
    _png(tmp_path / "two.jpg", (0, 0, 255))
    (tmp_path / "one.txt").write_text("A red box.\n")
    (tmp_path / "captions.json").write_text(json.dumps({"two.jpg": "A blue box."}))
    got = sources.image_folder(tmp_path)
    assert [s.answer for s in got] == ["A red box.", "A blue box."]
    (tmp_path / "three.png").write_bytes(b"")
    with pytest.raises(FP8MixError, match="three.png: no caption"):
        sources.image_folder(tmp_path)


def test_missing_source_is_one_clear_error(tmp_path):
    with pytest.raises(FP8MixError, match="not found"):
        sources.load(str(tmp_path / "missing.jsonl"), "calib", 4)


def test_overlap_is_refused():
    s = sources.embedded("calib", 3)
    with pytest.raises(FP8MixError, match="both the calibration and the evaluation"):
        sources.assert_disjoint(s, s[:1])


def test_real_mix_is_deterministic_held_out_and_at_photo_size():
    from fp8mix.data import real

    a = sources.load("real", "calib", 48, seed=0)
    assert [s.fingerprint() for s in a] == [s.fingerprint() for s in sources.load("real", "calib", 48, seed=0)]
    other_seed = sources.load("real", "calib", 48, seed=1)
    ev = sources.held_out("real", 48)
    sources.assert_disjoint(a + other_seed, ev)
    assert {s.source for s in a} == {"photos", "docs"}
    replies = {s.messages[-1]["content"][0]["text"] for s in a + other_seed}
    assert not replies & {s.messages[-1]["content"][0]["text"] for s in ev}
    held = {real.DESCRIBED[n][0] for n in real.EVAL_PHOTOS}
    assert all(s.messages[-1]["content"][0]["text"] in held for s in ev if s.images)
    photos = [s.images[0] for s in a if s.images]
    # the photos' own resolution (the embedded mix's crops are at most 336 x 336 = 113 k pixels)
    assert sorted(im.width * im.height for im in photos)[len(photos) // 2] > 150_000
    assert min(len(r) for r in replies) >= 150 and sum(map(len, replies)) / len(replies) >= 500


def test_real_samples_supervise_long_replies(embedded):
    """Every real sample's reply is tens to hundreds of tokens (measured with the Qwen2.5 tokenizer on 128
    calibration samples: photos 65-105, documentation 58-374, mean 171; the embedded tokenizer's counts are
    similar)."""
    from fp8mix.data.samples import encode, fit_samples

    samples, dropped = fit_samples(embedded.processor, sources.load("real", "calib", 12, seed=0))
    assert dropped == 0
    counts = [int((encode(embedded.processor, [s])["labels"] != -100).sum()) for s in samples]
    assert min(counts) >= 40 and sum(counts) / len(counts) >= 100, counts


def test_default_data_follows_the_model(tmp_path):
    """No --data: the embedded model gets its own mix, any other model the real photos and text."""
    from fp8mix.context import RunOptions, overrides

    assert overrides(RunOptions(run=tmp_path))["data"] == "embedded"
    assert overrides(RunOptions(run=tmp_path, model="embedded"))["data"] == "embedded"
    assert overrides(RunOptions(run=tmp_path, model=str(tmp_path)))["data"] == "real"
    chosen = RunOptions(run=tmp_path, model=str(tmp_path), score_overrides={"data": "embedded"})
    assert overrides(chosen)["data"] == "embedded"


def test_transparent_image_gets_transformers_pixels(tmp_path):
    """An RGBA image file reaches the model with the pixels transformers' own processor gives it (transparency on
    white), not those of a plain convert("RGB") (the colour under transparent pixels)."""
    import numpy as np

    from fp8mix.data.samples import ChatSample, encode
    from fp8mix.models.loading import EMBEDDED
    from fp8mix.models.processor import load_processor
    from transformers_path import official_inputs

    arr = np.zeros((56, 56, 4), np.uint8)
    arr[:28] = (200, 10, 10, 255)  # the lower half transparent black
    Image.fromarray(arr, "RGBA").save(tmp_path / "t.png")
    row = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "a"}]}], "images": ["t.png"]}
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    sample = sources.jsonl(tmp_path / "d.jsonl")[0]
    proc = load_processor(EMBEDDED)
    ref = official_inputs(proc, ChatSample(sample.messages, [Image.open(tmp_path / "t.png")]), for_generation=False)
    assert encode(proc, [sample])["pixel_values"].equal(ref["pixel_values"])


def test_an_image_too_long_for_the_processor_is_one_clear_error(tmp_path):
    """An image more than 200 times as long as it is wide (the Qwen image processors refuse it) stops with one line
    naming its source, not the processor's ValueError."""
    from fp8mix.data.samples import fit_samples
    from fp8mix.models.loading import EMBEDDED
    from fp8mix.models.processor import load_processor

    Image.new("RGB", (2100, 10), "red").save(tmp_path / "wide.png")
    row = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
                        {"role": "assistant", "content": "a"}], "images": ["wide.png"]}
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(FP8MixError, match="jsonl:d.jsonl is 2100x10 pixels: more than 200 times"):
        fit_samples(load_processor(EMBEDDED), sources.jsonl(tmp_path / "d.jsonl"))
