"""Qwen2-VL and Qwen3-VL: fp8mix's batches give the model what transformers' own processor -> model path gives it.

As tests/data/test_positions.py for Qwen2.5-VL: the reference runs one sample at a time through
`processor.apply_chat_template(..., tokenize=True, return_dict=True)` and `model(**inputs)` / `model.generate`;
fp8mix right-pads for scoring and left-pads for generation. Qwen3-VL's M-RoPE interleaves its time/height/width
sections over the rotary frequencies; a batch that loses `mm_token_type_ids` gets 1-D positions and moves the logits.
Small random models in float32.
"""

import pytest
import torch

from fp8mix.data import real, shapes
from fp8mix.data.samples import encode, model_inputs
from fp8mix.models import loading
from random_models import qwen2_vl_config, qwen3_vl_config, random_model_folder
from transformers_path import assert_generation_batch_matches, assert_scoring_batch_matches

ATOL = 2e-4  # float32 logits: padding and batching change summation order only
CONFIGS = {"qwen2_vl": qwen2_vl_config, "qwen3_vl": qwen3_vl_config}


@pytest.fixture(scope="module", params=list(CONFIGS))
def loaded(request, tmp_path_factory):
    folder = random_model_folder(tmp_path_factory.mktemp(request.param), CONFIGS[request.param]())
    return loading.load(str(folder))  # float32 on the CPU


def _samples():
    """Images of different sizes (different grids: real padding) and one text-only sample."""
    return [shapes.sample("eval", 0), real.photo_sample("eval", 1), real.text_sample("eval", 3),
            real.photo_sample("eval", 4)]


def test_scoring_batch_logits_match_transformers_path(loaded):
    assert_scoring_batch_matches(loaded.model, loaded.processor, _samples(), ATOL)


def test_generation_batch_matches_transformers_path(loaded):
    assert_generation_batch_matches(loaded.model, loaded.processor, _samples(), 6, ATOL)


@torch.no_grad()
def test_image_positions_are_3d_and_dropping_them_is_detected(loaded):
    model, proc = loaded.model, loaded.processor
    batch = model_inputs(encode(proc, [shapes.sample("eval", 0)]))
    pos, _ = model.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                        image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])
    image = batch["input_ids"][0] == model.config.image_token_id
    t, h, w = (pos[i, 0, image] for i in range(3))
    assert t.unique().numel() == 1 and h.unique().numel() > 1 and w.unique().numel() > 1  # one frame, a 2-D grid
    full = model(**batch, use_cache=False).logits
    batch.pop("mm_token_type_ids")
    try:  # transformers refuses the batch (Qwen2-VL) or falls back to 1-D positions (Qwen3-VL)
        flat = model(**batch, use_cache=False).logits
    except ValueError as exc:
        assert "mm_token_type_ids" in str(exc)
        return
    assert (full - flat).abs().max() > 100 * ATOL


@torch.no_grad()
def test_qwen3_vl_interleaves_its_mrope_sections(loaded, monkeypatch):
    """Qwen3-VL spreads time/height/width over the rotary frequencies in turn (t h w t h w …); the same weights with
    contiguous sections (Qwen2-VL's layout) give other logits on an image sample, so the layout matters and the
    batches above ran the interleaved one."""
    if loaded.adapter.family != "qwen3_vl":
        pytest.skip("Qwen2-VL's M-RoPE sections are contiguous")
    model, proc = loaded.model, loaded.processor
    rope = model.model.language_model.rotary_emb
    batch = model_inputs(encode(proc, [shapes.sample("eval", 0)]))
    ref = model(**batch, use_cache=False).logits

    def contiguous(freq):
        out = torch.cat([part[i % 3] for i, part in enumerate(freq.split(rope.mrope_section, dim=-1))], dim=-1)
        return torch.cat((out, out), dim=-1)

    monkeypatch.setattr(rope, "recomposition_frequencies", contiguous)
    assert (ref - model(**batch, use_cache=False).logits).abs().max() > 100 * ATOL
