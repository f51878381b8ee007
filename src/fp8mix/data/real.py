"""Real photos and real text that ship inside installed packages, so calibration works offline.

Photos: scikit-image's bundled sample images (licences from their docstrings) and matplotlib's sample photo of
Grace Hopper. Text: CPython's own documentation topics (`pydoc_data.topics`, PSF licence). Calibration and
evaluation use disjoint photos and disjoint topics.

Two uses. The embedded model's mix (`photo_sample`, `text_sample`): small crops with one-line captions and short
continuations, the sizes the tiny model was trained on. Real models (`described_photo_sample`, `doc_sample`,
`continuation_sample`): photos at their own resolution (the caller scales them to --max-pixels) with
multi-sentence descriptions, and documentation topics explained or continued at length, so that every sample
supervises a long reply.
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

# name -> (description, licence): the assistant's answer about the whole photo, for real models. Every photo of
# PHOTOS plus three more; the same calibration/evaluation split (EVAL_PHOTOS are held out).
DESCRIBED = {
    "astronaut": (
        "A formal portrait of a smiling woman astronaut, Eileen Collins, in an orange launch and entry suit. She "
        "has short light brown hair and wears the suit's metal neck ring, with a round mission patch and a name tag "
        "on the chest. Her white helmet with a dark, shiny visor rests in the lower right corner. Behind her the "
        "American flag hangs on the left, and a model of the space shuttle with its external tank and two white "
        "boosters stands on the right, against a soft grey studio backdrop.", "public domain (NASA)"),
    "chelsea": (
        "A close-up of the face of a tabby cat named Chelsea. Her fur is striped in brown, grey and cream, she has "
        "large yellow-green eyes with dark pupils, a pink nose and long white whiskers. She looks slightly to the "
        "left of the camera with an alert, curious expression, her ears pricked up. The background is out of focus "
        "in soft pale tones, so all the attention falls on her eyes.", "CC0"),
    "rocket": (
        "A SpaceX Falcon 9 rocket, carrying the DSCOVR satellite, stands upright on its launch pad at dusk. The "
        "tall white rocket is in the centre, between thin steel lattice towers, with two more lightning towers on "
        "either side. Bright floodlights glow along the ground at the base of the pad and light up the rocket's "
        "body. The sky is a deep evening blue, turning lighter near the horizon.", "public domain (SpaceX)"),
    "hubble_deep_field": (
        "A deep field image of the sky taken by the Hubble Space Telescope. Thousands of faint galaxies are "
        "scattered across a black background, each one a small smudge of light. Some are spirals and ellipticals in "
        "white and yellow, others are tiny red or blue dots that are extremely far away. A few brighter points with "
        "short spikes are stars of our own galaxy. The picture shows how crowded the universe is, even in a patch "
        "of sky that looks empty to the eye.", "public domain (NASA)"),
    "retina": (
        "A colour photograph of the back of a human eye, taken through the pupil with a fundus camera. The round "
        "image is orange-red inside a black border. On the left is the bright yellowish optic disc, from which many "
        "red blood vessels branch out and curve across the retina. Near the centre a darker spot marks the macula, "
        "and the vessels grow thinner toward the edge of the circle.", "CC0"),
    "immunohistochemistry": (
        "A microscope image of a tissue section stained by immunohistochemistry. Several large rounded clusters of "
        "cells are stained brown, and the outlines of their cells form a fine brown network. Between the clusters "
        "the tissue is pale, with small blue nuclei scattered through it. The brown colour marks where an antibody "
        "bound to its target protein; the blue is a counterstain.", "no known restrictions"),
    "coffee": (
        "A cup of espresso on a saucer, photographed from above at an angle on a wooden table. The cup and the "
        "saucer are a glossy red-brown, white inside the rim, and the coffee has a light brown crema on top. A "
        "small metal spoon rests on the saucer beside the handle. The grain of the old wooden table runs across the "
        "picture in warm brown tones.", "CC0"),
    "stereo_motorcycle": (
        "A red motorcycle parked on the concrete floor of a garage. It has a black seat, a chrome engine and "
        "exhaust pipes, a round headlight and two wheels with black tyres, and it leans on its side stand. Behind it "
        "are metal shelves full of cardboard boxes, plastic containers and tools, and a wooden bench stands against "
        "the wall on the left. The picture is evenly lit and sharp from front to back.",
        "Middlebury stereo data set"),
    "camera": (
        "A black and white photograph of a man working a camera on a tripod in an open field. He wears a long dark "
        "coat and gloves and bends forward to look through the camera. Flat grass stretches behind him to a row of "
        "buildings on the horizon, among them a domed building and a tall tower. The sky is plain and pale. This is "
        "the well-known cameraman test image of image processing.", "CC0"),
    "coins": (
        "A black and white photograph of ancient Greek coins from Pompeii, laid out in four rows on a dark "
        "background. There are about two dozen coins of slightly different sizes, and most show a worn head in "
        "profile or a standing figure. The light comes from one side, so their raised designs shine against the "
        "black surface.", "no known restrictions"),
    "moon": (
        "A grey photograph of the surface of the moon. A round crater with a bright rim stands out near the top "
        "left. The rest of the surface is smooth and mottled, with many small pits and a few darker patches in the "
        "lower part. The light comes from one side, so raised edges look bright and hollows look dark.",
        "public domain"),
    "page": (
        "A photograph of a printed page from a tutorial on image processing. The heading reads \"Region-based "
        "segmentation\". The paragraph below explains that the first step is to find markers of the coins and of "
        "the background: pixels that can be labelled as object or background without doubt, taken from the two "
        "extreme parts of the histogram of grey values. At the bottom, a line of Python code begins with "
        "\"markers = np.zeros_like(coins)\". The page is lit unevenly.", "CC0"),
    "text": (
        "A black and white close-up of handwritten mathematics on a sheet of paper, photographed at an angle. "
        "Several lines of equations are written in dark ink, with fractions, variables and equal signs. The "
        "writing runs diagonally across the frame and the far corner is slightly out of focus. The paper is grey, "
        "lighter on one side than the other.", "public domain"),
    "clock": (
        "A black and white photograph of a round clock that moved while the picture was taken. The clock face is a "
        "bright, blurred oval in the middle of the frame, its hands and numbers smeared by the motion. Around it is "
        "a smooth, plain grey background. The photo is an example of motion blur, the kind of damage that image "
        "restoration tries to undo.", "public domain"),
    "brick": (
        "A black and white photograph of a brick pavement seen at a slight angle. Long, narrow bricks are laid in "
        "rows, each row offset from the next like a running bond. Thin light lines of mortar separate the dark grey "
        "bricks. The pattern recedes toward the top of the picture, where the bricks look smaller and closer "
        "together.", "CC0"),
    "grass": (
        "A black and white close-up of a patch of lawn seen from above. Countless thin blades of grass cross each "
        "other in every direction, mixed with a few small leaves and weeds. Light and shadow make a fine, busy "
        "texture with no single subject, the kind of natural texture that image analysis methods are tested on.",
        "CC0"),
    "gravel": (
        "A black and white close-up of gravel seen from above. Thousands of small angular stones fill the whole "
        "frame, packed tightly together. Each stone has light faces and dark shadows, which gives a rough, even "
        "texture with no single subject. The stones are about the same size all over the picture.", "CC0"),
    "cell": (
        "A grey microscope image of a single cell floating in saline, recorded with digital holographic "
        "microscopy. The cell appears as a bright round disc with a textured surface on the right side of the "
        "frame, and a dark halo surrounds it. The rest of the picture is a smooth, mottled grey background with "
        "faint ripples from the optics.", "CC0"),
    "grace_hopper": (
        "An official portrait of Grace Hopper, the computer scientist and United States Navy officer. She is an "
        "elderly woman with grey hair and large glasses, in a dark navy uniform with a white shirt, a black tie, "
        "rows of ribbons and a name tag. Her officer's cap carries a gold badge. The American flag stands behind "
        "her on the left in front of a plain blue background, and she looks straight at the camera.",
        "public domain (US Navy)"),
}
PHOTO_PROMPTS = (
    "Describe this photo in detail.",
    "What is shown in this image? Give a thorough description.",
    "Write a detailed caption for this picture.",
    "Look at the image and describe everything you can see.",
    "Describe the main subject of this photo, its colours and its surroundings.",
)


@lru_cache(maxsize=None)
def _native(name: str) -> Image.Image:
    """A photo at its own resolution, RGB."""
    if name == "grace_hopper":
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            return Image.open(f).convert("RGB")
    import skimage.data

    arr = getattr(skimage.data, name)()
    if isinstance(arr, tuple):  # the stereo pair: its left view
        arr = arr[0]
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return Image.fromarray(arr).convert("RGB")


@lru_cache(maxsize=None)
def _photo(name: str) -> Image.Image:
    img = _native(name).copy()
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


def described_photo_sample(split: str, rng: random.Random) -> ChatSample:
    """A photo of the split at its own resolution, cropped to 80-100 % of each side, with a request for a
    description and its multi-sentence answer."""
    names = [n for n in DESCRIBED if (n in EVAL_PHOTOS) == (split == "eval")]
    name = rng.choice(names)
    img = _native(name)
    w, h = img.size
    cw, ch = int(w * rng.uniform(0.8, 1.0)), int(h * rng.uniform(0.8, 1.0))
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    crop = img.crop((x0, y0, x0 + cw, y0 + ch))
    prompt = rng.choice(PHOTO_PROMPTS)
    return ChatSample([user_turn(prompt, 1), assistant_turn(DESCRIBED[name][0])], [crop], None, "photos")


@lru_cache(maxsize=1)
def _topics() -> tuple[tuple[tuple[str, tuple[str, ...]], ...], tuple[tuple[str, tuple[str, ...]], ...]]:
    """The documentation topics as (title, paragraphs), split as `text_paragraphs` splits them: (calibration,
    evaluation). Paragraphs keep their line breaks (code examples stay indented); a calibration topic loses the
    paragraphs that also occur in an evaluation topic."""
    from pydoc_data.topics import topics

    calib, evaluation = [], []
    for i, key in enumerate(sorted(topics)):
        title, _, body = topics[key].strip().partition("\n")
        paras = [_reflow(p.strip("\n").rstrip()) for p in body.split("\n\n")]
        paras = [p for p in paras if p.strip() and set(p.strip()) - set("*=-")]
        (evaluation if i % 4 == 3 else calib).append((title.strip(), tuple(paras)))
    held = {" ".join(p.split()) for _, paras in evaluation for p in paras}
    calib = [(t, tuple(p for p in paras if " ".join(p.split()) not in held)) for t, paras in calib]
    return tuple((t, p) for t, p in calib if p), tuple(evaluation)


def _reflow(para: str) -> str:
    """A prose paragraph on one line (the topics are wrapped at 70 columns); code and headings as they are."""
    lines = para.split("\n")
    if any(ln[:1].isspace() or (ln.strip() and not set(ln.strip()) - set("*=-")) for ln in lines):
        return para
    return " ".join(ln.strip() for ln in lines)


def _cut(text: str, limit: int) -> str:
    """`text` up to `limit` characters, ended at the last paragraph or sentence end before it (else a space)."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    end = max(head.rfind("\n\n"), head.rfind(". ") + 1, head.rfind(".\n") + 1)
    return head[:end] if end > limit // 2 else head[:head.rfind(" ")]


DOC_PROMPTS = (
    "Explain {} in Python.",
    "What does the Python language reference say about {}?",
    "I am learning Python. Can you describe {} for me?",
    "Give me an overview of {} in Python, with the syntax.",
)
REPLY_CHARS = 1500  # about 350 tokens of documentation text per reply


def doc_sample(split: str, rng: random.Random) -> ChatSample:
    """A question about a documentation topic of the split, answered by the topic's own text."""
    title, paras = rng.choice(_topics()[1 if split == "eval" else 0])
    subject = title[0].lower() + title[1:] if title.startswith("The ") else title
    start = rng.randrange(0, max(1, len(paras) - 3)) if rng.random() < 0.3 else 0
    reply = _cut("\n\n".join(paras[start:]), REPLY_CHARS)
    return ChatSample([user_turn(rng.choice(DOC_PROMPTS).format(subject)), assistant_turn(reply)], [], None, "docs")


def continuation_sample(split: str, rng: random.Random) -> ChatSample:
    """The start of a documentation topic of the split, and its continuation as the reply."""
    long = [t for t in _topics()[1 if split == "eval" else 0] if len("\n\n".join(t[1])) >= 1000]
    title, paras = rng.choice(long)
    text = "\n\n".join(paras)
    cut = text.rfind(" ", 0, int(min(len(text), 2500) * rng.uniform(0.25, 0.4)))
    head, tail = text[:cut], _cut(text[cut + 1:], REPLY_CHARS)
    prompt = f"Continue this passage from the Python documentation ({title}):\n\n{head}"
    return ChatSample([user_turn(prompt), assistant_turn(tail)], [], None, "docs")
