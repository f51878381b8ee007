import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from random_models import add_embedded_processor, tiny_random_config
from fp8mix.models import loading


def _save(folder, seed):
    torch.manual_seed(seed)
    Qwen2_5_VLForConditionalGeneration(tiny_random_config()).to(torch.bfloat16).save_pretrained(folder)
    add_embedded_processor(folder)
    return folder


def test_fingerprint_tells_apart_models_of_equal_layout_and_other_weights(tmp_path):
    a, b = _save(tmp_path / "a", 0), _save(tmp_path / "b", 1)
    assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()
    assert loading.fingerprint(a) != loading.fingerprint(b)


def test_fingerprint_is_the_same_for_a_copy_of_the_same_weights(tmp_path):
    import shutil

    a = _save(tmp_path / "a", 0)
    shutil.copytree(a, tmp_path / "copy")
    assert loading.fingerprint(a) == loading.fingerprint(tmp_path / "copy")
