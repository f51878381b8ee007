"""Small random Qwen2.5-VL configs built inside the tests, and what a random model folder needs besides weights."""

from pathlib import Path


def tiny_random_config(**text):
    """A small random Qwen2.5-VL config built inside the tests (different sizes from the embedded model)."""
    from transformers import Qwen2_5_VLConfig

    t = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    t.update(text)
    return Qwen2_5_VLConfig(
        text_config=t,
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=60, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503,
        tie_word_embeddings=t["tie_word_embeddings"])


def add_embedded_processor(folder: Path) -> None:
    """Copy the embedded model's processor, tokenizer, chat template and generation config (the files the export
    carries along: AUX_FILES) into a folder of random weights, so that it exports and loads like a real one."""
    import shutil

    from fp8mix.export.folder import AUX_FILES
    from fp8mix.models.loading import EMBEDDED

    for pattern in AUX_FILES:
        for f in EMBEDDED.glob(pattern):
            if f.is_file() and not (Path(folder) / f.name).exists():
                shutil.copy(f, folder)
