"""Qwen2.5-VL processor that works without torchvision.

transformers' own Qwen2_5_VLProcessor insists on a video processor, which needs torchvision; fp8mix only feeds
images, so the video slot is dropped and the PIL image processor is used (it matches the torchvision one to
one uint8 step). On disk the files stay the standard ones, so vLLM and AutoProcessor read them unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, Qwen2_5_VLProcessor

try:
    from transformers import Qwen2VLImageProcessorPil
except ImportError:  # transformers < 5.?: the slow processor had the plain name
    from transformers import Qwen2VLImageProcessor as Qwen2VLImageProcessorPil

# The official Qwen2.5-VL chat template (checkpoints on the hub ship it in chat_template.json).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor without the video slot (the video processor needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         chat_template=chat_template, **kwargs)


def _chat_template(folder: Path, tokenizer) -> str:
    for name in ("chat_template.jinja", "chat_template.json"):
        path = folder / name
        if path.is_file():
            text = path.read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE


def load_processor(folder: str | Path) -> ImageOnlyQwen2_5_VLProcessor:
    """Assemble the processor from a local checkpoint folder's standard files."""
    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(folder)
    return ImageOnlyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        chat_template=_chat_template(folder, tokenizer))


def save_processor(processor: ImageOnlyQwen2_5_VLProcessor, folder: str | Path) -> None:
    """Write the processor as a stock Qwen2_5_VLProcessor, so vLLM and AutoProcessor load it with torchvision."""
    folder = Path(folder)
    processor.save_pretrained(folder)
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            cfg = json.loads(path.read_text())
            if "processor_class" in cfg:
                cfg["processor_class"] = "Qwen2_5_VLProcessor"
            if isinstance(cfg.get("image_processor"), dict):
                cfg["image_processor"]["image_processor_type"] = "Qwen2VLImageProcessor"
            path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    # vLLM and older transformers read the image processor from preprocessor_config.json.
    pre = folder / "preprocessor_config.json"
    if not pre.is_file():
        cfg = processor.image_processor.to_dict()
        cfg["image_processor_type"] = "Qwen2VLImageProcessor"
        cfg["processor_class"] = "Qwen2_5_VLProcessor"
        pre.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
