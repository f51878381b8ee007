"""fp8mix's batches give the model exactly what transformers' own processor -> model path gives it.

The reference is the path a user of transformers runs (tests/transformers_path.py):
`processor.apply_chat_template(messages with images, tokenize=True, return_dict=True)` then `model(**inputs)` /
`model.generate(**inputs)`, one sample at a time (no padding). fp8mix's path batches several samples (right-padded
for scoring, left-padded for generation) through `data.samples.encode`. Qwen2.5-VL's image tokens need their 3-D
M-RoPE positions: a batch that loses `mm_token_type_ids` falls back to 1-D positions and its logits move by whole
nats, far outside these tolerances. Both models run in float32.
"""

from __future__ import annotations

import pytest
import torch

from fp8mix.data import shapes, real
from fp8mix.data.samples import encode, model_inputs
from random_models import tiny_random_config
from transformers_path import assert_generation_batch_matches, assert_scoring_batch_matches

ATOL = 2e-4  # float32 logits; padding and batching change summation order only (measured <= 2e-5)


def _samples():
    """Image samples of different sizes (different grids and sequence lengths: real padding), and one text-only."""
    return [shapes.sample("eval", 0), real.photo_sample("eval", 1), shapes.sample("eval", 2),
            real.text_sample("eval", 3), real.photo_sample("eval", 4)]


@pytest.fixture(scope="module", params=["embedded", "random_gqa"])
def model_and_processor(request, embedded, tmp_path_factory):
    if request.param == "embedded":
        return embedded.model.float().eval(), embedded.processor
    from transformers import Qwen2_5_VLForConditionalGeneration

    from fp8mix.models.loading import EMBEDDED
    from fp8mix.models.processor import load_processor

    torch.manual_seed(0)
    emb = embedded.model.config
    cfg = tiny_random_config(vocab_size=emb.text_config.vocab_size, num_attention_heads=4, num_key_value_heads=1,
                             hidden_size=128, intermediate_size=256,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6]})
    for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        setattr(cfg, k, getattr(emb, k))
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(cfg.text_config, k, getattr(emb.text_config, k, None))
    cfg.vision_config.out_hidden_size = 128
    model = Qwen2_5_VLForConditionalGeneration(cfg).float().eval()
    return model, load_processor(EMBEDDED)


def test_scoring_batch_logits_match_transformers_path(model_and_processor):
    assert_scoring_batch_matches(*model_and_processor, _samples(), ATOL)


def test_generation_batch_matches_transformers_path(model_and_processor):
    assert_generation_batch_matches(*model_and_processor, _samples(), 8, ATOL)


@torch.no_grad()
def test_dropping_mm_token_type_ids_is_detected(embedded):
    """The failure this file guards against, measured: without mm_token_type_ids the image positions are 1-D."""
    model, proc = embedded.model.float().eval(), embedded.processor
    batch = model_inputs(encode(proc, [shapes.sample("eval", 0)]))
    full = model(**batch, use_cache=False).logits
    batch.pop("mm_token_type_ids")
    flat = model(**batch, use_cache=False).logits
    assert (full - flat).abs().max() > 100 * ATOL
