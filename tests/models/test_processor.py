from fp8mix.data import shapes
from fp8mix.data.samples import encode
from fp8mix.models.processor import load_processor
from fp8mix.models.loading import EMBEDDED


def test_chat_template_and_image_pad_count():
    proc = load_processor(EMBEDDED)
    s = shapes.sample("eval", 0)
    enc = encode(proc, [s])
    pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # 112x112 -> 8x8 patches of 14 -> merged 2x2 -> 16 image tokens
    assert enc["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert int((enc["input_ids"] == pad).sum()) == 16
    assert enc["pixel_values"].shape == (64, 3 * 2 * 14 * 14)
    text = proc.tokenizer.decode(enc["input_ids"][0])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|><|image_pad|>")
    # labels cover exactly the assistant reply and its <|im_end|>
    labelled = enc["input_ids"][0][enc["labels"][0] != -100]
    assert proc.tokenizer.decode(labelled) == s.answer + "<|im_end|>"


def test_generation_prompt_is_left_padded_and_ends_with_header():
    proc = load_processor(EMBEDDED)
    batch = [shapes.sample("eval", i) for i in range(3)]
    enc = encode(proc, batch, for_generation=True)
    assert "labels" not in enc
    assert bool((enc["attention_mask"][:, -1] == 1).all())
    assert proc.tokenizer.decode(enc["input_ids"][0]).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_saved_processor_is_stock_qwen(tmp_path):
    import json

    from fp8mix.models.processor import save_processor

    save_processor(load_processor(EMBEDDED), tmp_path)
    pre = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "Qwen2VLImageProcessor"
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    again = load_processor(tmp_path)
    s = shapes.sample("eval", 1)
    a, b = encode(load_processor(EMBEDDED), [s]), encode(again, [s])
    assert a["input_ids"].equal(b["input_ids"]) and a["pixel_values"].equal(b["pixel_values"])
