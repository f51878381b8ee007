"""The embedded model's image-grounded task: coloured shapes drawn with PIL, with questions whose answers need the image.

Every sample is a pure function of (split, index), so calibration, evaluation and training streams never share a
sample and the same index always gives the same pixels.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from .samples import ChatSample, assistant_turn, user_turn

SIZE = 112
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
          "purple": (140, 50, 170)}
KINDS = ("circle", "square", "triangle")
NUMBERS = ("Zero", "One", "Two", "Three", "Four")
QUESTION_TYPES = ("count", "color_of", "kind_of")


def _draw(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def render(rng: random.Random) -> tuple[Image.Image, list[tuple[str, str]]]:
    """An image with 1-4 shapes, one per quadrant, and the list of (color, kind) drawn."""
    bg = tuple(rng.randint(225, 255) for _ in range(3))
    img = Image.new("RGB", (SIZE, SIZE), bg)
    draw = ImageDraw.Draw(img)
    half = SIZE // 2
    cells = rng.sample([(0, 0), (1, 0), (0, 1), (1, 1)], rng.randint(1, 4))
    shapes = []
    for cx, cy in cells:
        color, kind = rng.choice(list(COLORS)), rng.choice(KINDS)
        side = rng.randint(30, 46)
        x0 = cx * half + rng.randint(2, half - side - 2)
        y0 = cy * half + rng.randint(2, half - side - 2)
        _draw(draw, kind, (x0, y0, x0 + side, y0 + side), COLORS[color])
        shapes.append((color, kind))
    return img, shapes


def _question(rng: random.Random, shapes: list[tuple[str, str]]) -> tuple[str, str]:
    kinds = [k for _, k in shapes]
    colors = [c for c, _ in shapes]
    unique_kind = [s for s in shapes if kinds.count(s[1]) == 1]
    unique_color = [s for s in shapes if colors.count(s[0]) == 1]
    options = ["count"] + (["color_of"] if unique_kind else []) + (["kind_of"] if unique_color else [])
    qtype = rng.choice(options)
    if qtype == "count":
        return "How many shapes are in the picture?", f"{NUMBERS[len(shapes)]}."
    if qtype == "color_of":
        color, kind = rng.choice(unique_kind)
        return f"What color is the {kind}?", f"{color.capitalize()}."
    color, kind = rng.choice(unique_color)
    return f"Which shape is {color}?", f"The {kind}."


def sample(split: str, index: int) -> ChatSample:
    """Sample `index` of stream `split` ("train", "calib" or "eval")."""
    rng = random.Random(f"fp8mix-shapes:{split}:{index}")
    img, shapes = render(rng)
    question, answer = _question(rng, shapes)
    return ChatSample([user_turn(question, 1), assistant_turn(answer)], [img], answer, "shapes")


def samples(split: str, n: int, start: int = 0) -> list[ChatSample]:
    return [sample(split, i) for i in range(start, start + n)]
