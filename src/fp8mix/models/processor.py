"""The family's processor, built without torchvision.

transformers' Qwen2-VL, Qwen2.5-VL and Qwen3-VL processors insist on a video processor, which needs torchvision;
fp8mix only feeds images, so the video slot is dropped and the PIL image processor is used (it matches the
torchvision one to one uint8 step). On disk the files stay the standard ones, so vLLM and AutoProcessor read them
unchanged. Which processor class a folder gets comes from its config.json's architecture (the family adapter).
"""

from __future__ import annotations

import json
from pathlib import Path

import transformers
from transformers import AutoTokenizer

from ..errors import FP8MixError

try:
    from transformers import Qwen2VLImageProcessorPil
except ImportError:  # transformers < 5.?: the slow processor had the plain name
    from transformers import Qwen2VLImageProcessor as Qwen2VLImageProcessorPil

# The official Qwen2-VL / Qwen2.5-VL chat template (checkpoints on the hub ship it in chat_template.json).
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
# The Qwen3-VL Instruct chat template without its tool-calling branches (no default system prompt; a system message,
# user images and text, assistant text, the generation header), for folders that ship none.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\n' }}{%- if messages[0].content is string %}"
    "{{- messages[0].content }}{%- else %}{%- for content in messages[0].content %}{%- if 'text' in content %}"
    "{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}{{- '<|im_start|>' + message.role + '\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- else %}{%- for content in message.content %}"
    "{%- if content.type == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}{%- if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif -%}<|vision_start|><|image_pad|><|vision_end|>{%- elif content.type == 'video' or 'video' in content %}"
    "{%- set video_count.value = video_count.value + 1 %}{%- if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif -%}<|vision_start|><|video_pad|><|vision_end|>{%- elif 'text' in content %}{{- content.text }}"
    "{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\n' }}{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\n' }}{%- if message.content is string %}{{- message.content }}{%- else %}"
    "{%- for content_item in message.content %}{%- if 'text' in content_item %}{{- content_item.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
DEFAULT_TEMPLATES = {"Qwen3VLProcessor": QWEN3_VL_CHAT_TEMPLATE}


def image_only(processor_class: str) -> type:
    """transformers' `processor_class` without the video slot (its video processor needs torchvision)."""
    base = getattr(transformers, processor_class)

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        base.__init__(self, image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                      chat_template=chat_template, **kwargs)

    return type(f"ImageOnly{processor_class}", (base,), {"__init__": __init__, "stock_class": processor_class})


ImageOnlyQwen2_5_VLProcessor = image_only("Qwen2_5_VLProcessor")


def _chat_template(folder: Path, tokenizer, processor_class: str) -> str:
    for name in ("chat_template.jinja", "chat_template.json"):
        path = folder / name
        if path.is_file():
            text = path.read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return getattr(tokenizer, "chat_template", None) or DEFAULT_TEMPLATES.get(processor_class, CHAT_TEMPLATE)


def _processor_class(folder: Path) -> str:
    """The family's processor class: from config.json's architecture, else (a folder of processor files only) the
    stock class its processor files name."""
    from . import ADAPTERS, adapter_for

    if (folder / "config.json").is_file():  # loading.load has checked it
        archs = json.loads((folder / "config.json").read_text()).get("architectures") or [""]
        return adapter_for(archs[0]).processor_class
    known = {cls.processor_class for cls in ADAPTERS}
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = folder / name
        if path.is_file() and json.loads(path.read_text()).get("processor_class") in known:
            return json.loads(path.read_text())["processor_class"]
    raise FP8MixError(f"{folder} has no config.json, and its processor files name no processor class of "
                      f"{', '.join(sorted(known))}")


def load_processor(folder: str | Path):
    """Assemble the family's processor from a local checkpoint folder's standard files."""
    folder = Path(folder)
    name = _processor_class(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(folder)
    return image_only(name)(image_processor=image_processor, tokenizer=tokenizer,
                            chat_template=_chat_template(folder, tokenizer, name))


def save_processor(processor, folder: str | Path) -> None:
    """Write the processor as its stock class (Qwen2_5_VLProcessor, …), so vLLM and AutoProcessor load it with
    torchvision."""
    folder = Path(folder)
    stock = getattr(processor, "stock_class", type(processor).__name__)
    processor.save_pretrained(folder)
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            cfg = json.loads(path.read_text())
            if "processor_class" in cfg:
                cfg["processor_class"] = stock
            if isinstance(cfg.get("image_processor"), dict):
                cfg["image_processor"]["image_processor_type"] = "Qwen2VLImageProcessor"
            path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    # vLLM and older transformers read the image processor from preprocessor_config.json.
    pre = folder / "preprocessor_config.json"
    if not pre.is_file():
        cfg = processor.image_processor.to_dict()
        cfg["image_processor_type"] = "Qwen2VLImageProcessor"
        cfg["processor_class"] = stock
        pre.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
