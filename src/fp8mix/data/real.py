"""Real photos and real text that ship inside installed packages, so calibration works offline.

Photos: scikit-image's bundled sample images (licences from their docstrings). Text: CPython's own
documentation topics (`pydoc_data.topics`, PSF licence). Calibration and evaluation use disjoint photos and
disjoint topics.
"""

from __future__ import annotations

import random
from functools import lru_cache

import numpy as np
from PIL import Image

from .samples import ChatSample, assistant_turn, user_turn

# name -> (caption, licence); the caption is the assistant's answer to "Describe this photo."
PHOTOS = {
    "astronaut": ("An astronaut in an orange suit smiling in front of the American flag.", "public domain (NASA)"),
    "coffee": ("A cup of coffee on a saucer, seen from above.", "CC0"),
    "chelsea": ("A tabby cat looking to the side.", "CC0"),
    "rocket": ("A rocket lifting off from its launch pad.", "public domain (SpaceX)"),
    "hubble_deep_field": ("Many small galaxies scattered across dark space.", "public domain (NASA)"),
    "retina": ("A photo of the back of a human eye with red blood vessels.", "CC0"),
    "immunohistochemistry": ("A microscope image of stained tissue with brown and blue cells.", "no known restrictions"),
    "camera": ("A black and white photo of a man with a camera on a tripod.", "CC0"),
    "coins": ("A black and white photo of old coins in rows.", "no known restrictions"),
    "moon": ("A grey photo of the surface of the moon with craters.", "public domain"),
    "text": ("A black and white photo of printed text.", "public domain"),
    "clock": ("A black and white photo of a wall clock.", "public domain"),
    "brick": ("A grey texture of a brick wall.", "CC0"),
    "grass": ("A grey texture of grass.", "CC0"),
    "gravel": ("A grey texture of gravel.", "CC0"),
    "cell": ("A grey microscope image of a cell.", "CC0"),
}
EVAL_PHOTOS = ("coffee", "moon", "gravel", "immunohistochemistry")
CALIB_PHOTOS = tuple(p for p in PHOTOS if p not in EVAL_PHOTOS)
MAX_SIDE = 168  # keeps a photo at <= 12x12 patches (36 image tokens) for the tiny model


@lru_cache(maxsize=None)
def _photo(name: str) -> Image.Image:
    import skimage.data

    arr = getattr(skimage.data, name)()
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    img = Image.fromarray(arr).convert("RGB")
    img.thumbnail((MAX_SIDE * 2, MAX_SIDE * 2))
    return img


def photo_sample(split: str, index: int) -> ChatSample:
    """A random crop of one of the split's photos, with its caption."""
    names = EVAL_PHOTOS if split == "eval" else CALIB_PHOTOS
    rng = random.Random(f"fp8mix-photos:{split}:{index}")
    name = names[index % len(names)]
    img = _photo(name)
    w, h = img.size
    cw, ch = int(w * rng.uniform(0.7, 1.0)), int(h * rng.uniform(0.7, 1.0))
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    crop = img.crop((x0, y0, x0 + cw, y0 + ch))
    crop.thumbnail((MAX_SIDE, MAX_SIDE))
    caption = PHOTOS[name][0]
    return ChatSample([user_turn("Describe this photo.", 1), assistant_turn(caption)], [crop], None, "photos")


@lru_cache(maxsize=1)
def _paragraphs() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Paragraphs of at least 200 characters from the documentation topics: (calibration, evaluation)."""
    from pydoc_data.topics import topics

    calib, evaluation = [], []
    for i, key in enumerate(sorted(topics)):
        paras = [" ".join(p.split()) for p in topics[key].split("\n\n")]
        paras = [p for p in paras if len(p) >= 200]
        (evaluation if i % 4 == 3 else calib).extend(paras)
    held_out = set(evaluation)  # some paragraphs recur across topics
    evaluation = list(dict.fromkeys(evaluation))
    calib = [p for p in dict.fromkeys(calib) if p not in held_out]
    return tuple(calib), tuple(evaluation)


def text_paragraphs(split: str) -> tuple[str, ...]:
    calib, evaluation = _paragraphs()
    return evaluation if split == "eval" else calib


def text_sample(split: str, index: int, max_chars: int = 400) -> ChatSample:
    """A continuation task on a real paragraph: the user gives its start, the assistant continues it."""
    paras = text_paragraphs(split)
    para = paras[index % len(paras)][:max_chars]
    cut = para.rfind(" ", 0, len(para) // 2)
    head, tail = para[:cut], para[cut + 1:]
    return ChatSample([user_turn("Continue the text: " + head), assistant_turn(tail)], [], None, "text")
