"""Calibration and evaluation sets: the embedded generator, a JSONL file, an image folder with captions, or a
Hugging Face dataset. Calibration and evaluation never share a sample."""

from __future__ import annotations

import hashlib
import json
import random
from functools import lru_cache
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import FP8MixError
from . import real, shapes
from .samples import ChatSample, assistant_turn, message_text, rgb, user_turn

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
EMBEDDED = "embedded"
# Share of each embedded source in calibration: mostly the image task, plus real photos and real text.
EMBEDDED_MIX = (("shapes", 0.70), ("photos", 0.15), ("text", 0.15))
REAL = "real"
# The built-in data for real models: photos at their own resolution with long descriptions, documentation topics
# explained and continued at length (data/real.py).
REAL_MIX = (("photos", 0.50), ("docs", 0.25), ("continue", 0.25))


def default_source(embedded_model: bool) -> str:
    """The data when --data is not given: the embedded model's own mix (its shapes task is what it was trained
    on), and real photos and text at realistic size for every other model."""
    return EMBEDDED if embedded_model else REAL


def embedded(split: str, n: int, seed: int = 0) -> list[ChatSample]:
    """n samples of the embedded mix. Different seeds draw different samples of the same split."""
    rng = random.Random(f"fp8mix-mix:{split}:{seed}")
    base = seed * 1_000_000
    kinds = [name for name, share in EMBEDDED_MIX for _ in range(round(share * 100))]
    out = []
    for i in range(n):
        kind = rng.choice(kinds)
        if kind == "shapes":
            out.append(shapes.sample(split, base + i))
        elif kind == "photos":
            out.append(real.photo_sample(split, base + i))
        else:
            out.append(real.text_sample(split, base + i))
    return out


def real_mix(split: str, n: int, seed: int = 0) -> list[ChatSample]:
    """n samples of the real-model mix. Different seeds draw different samples of the same split."""
    rng = random.Random(f"fp8mix-real:{split}:{seed}")
    kinds = [name for name, share in REAL_MIX for _ in range(round(share * 100))]
    make = {"photos": real.described_photo_sample, "docs": real.doc_sample, "continue": real.continuation_sample}
    return [make[rng.choice(kinds)](split, rng) for _ in range(n)]


def _open_image(path: Path, where: str) -> Image.Image:
    if not path.is_file():
        raise FP8MixError(f"{where}: image {path} not found")
    try:
        with Image.open(path) as img:
            return rgb(img)
    except (UnidentifiedImageError, OSError) as exc:
        raise FP8MixError(f"{where}: cannot read image {path} ({type(exc).__name__})") from None


def _count_images(messages: list[dict]) -> int:
    return sum(1 for m in messages if isinstance(m.get("content"), list)
               for c in m["content"] if isinstance(c, dict) and c.get("type") == "image")


def _last_answer(messages: list[dict]) -> str | None:
    if not messages or messages[-1].get("role") != "assistant":
        return None
    return message_text(messages[-1]["content"]) or None


def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise FP8MixError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or "content" not in m:
            raise FP8MixError(f"{where}: each message needs a role (system, user or assistant) and a content")
        content = m["content"]
        if not isinstance(content, str) and not (isinstance(content, list) and all(
                isinstance(c, dict) and (c.get("type") == "image" or (c.get("type") == "text" and
                                                                      isinstance(c.get("text"), str)))
                for c in content)):
            raise FP8MixError(f"{where}: a message's content must be a string or a list of "
                              '{"type": "text", "text": "..."} and {"type": "image"} items')


def jsonl(path: Path) -> list[ChatSample]:
    """One sample a line: {"messages": [...], "images": [paths relative to the file]}."""
    if not path.is_file():
        raise FP8MixError(f"data file {path} not found")
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FP8MixError(f"{where}: not valid JSON ({exc.msg}); expected "
                              '{"messages": [...], "images": [...]}') from None
        if not isinstance(row, dict) or "messages" not in row:
            raise FP8MixError(f"{where}: missing 'messages'; expected " '{"messages": [...], "images": [...]}')
        messages, paths = row["messages"], row.get("images", [])
        _check_messages(messages, where)
        if isinstance(paths, list) and not all(isinstance(p, str) for p in paths):
            raise FP8MixError(f"{where}: 'images' must be a list of image file paths")
        if not isinstance(paths, list) or _count_images(messages) != len(paths):
            raise FP8MixError(f"{where}: {_count_images(messages)} image item(s) in messages but "
                              f"{len(paths) if isinstance(paths, list) else 'no list of'} image path(s)")
        images = [_open_image((path.parent / p) if not Path(p).is_absolute() else Path(p), where) for p in paths]
        out.append(ChatSample(messages, images, _last_answer(messages), f"jsonl:{path.name}"))
    if not out:
        raise FP8MixError(f"{path} holds no samples")
    return out


def image_folder(path: Path, prompt: str = "Describe this image.") -> list[ChatSample]:
    """Images with captions: a sidecar NAME.txt per image, or captions.json {file name: caption}."""
    images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FP8MixError(f"{path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    table = {}
    if (path / "captions.json").is_file():
        try:
            table = json.loads((path / "captions.json").read_text())
        except json.JSONDecodeError as exc:
            raise FP8MixError(f"{path / 'captions.json'}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    out = []
    for img_path in images:
        side = img_path.with_suffix(".txt")
        caption = side.read_text().strip() if side.is_file() else table.get(img_path.name)
        if not caption:
            raise FP8MixError(f"{img_path}: no caption (add {side.name} or an entry in captions.json)")
        img = _open_image(img_path, str(img_path))
        out.append(ChatSample([user_turn(prompt, 1), assistant_turn(caption)], [img], caption, f"folder:{path.name}"))
    return out


def hf_dataset(name: str, split: str = "train", limit: int | None = None) -> list[ChatSample]:
    """A Hugging Face dataset with `messages` + `images` columns, or `image` + `caption`/`text` columns."""
    try:
        import datasets
    except ImportError:
        raise FP8MixError("Hugging Face datasets need the 'datasets' package: pip install 'fp8mix[hf]'") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:
        raise FP8MixError(f"cannot load dataset {name} ({type(exc).__name__}); it needs the network") from None
    out = []
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            break
        if "messages" in row:
            imgs = [rgb(im) for im in (row.get("images") or [])]
            out.append(ChatSample(row["messages"], imgs, _last_answer(row["messages"]), f"hf:{name}"))
        elif "image" in row and ("caption" in row or "text" in row):
            cap = row.get("caption") or row.get("text")
            out.append(ChatSample([user_turn("Describe this image.", 1), assistant_turn(cap)],
                                  [rgb(row["image"])], cap, f"hf:{name}"))
        else:
            raise FP8MixError(f"dataset {name} has neither messages+images nor image+caption columns")
    return out


def load(source: str, split: str, n: int, seed: int = 0, shared: bool = True) -> list[ChatSample]:
    """Up to n samples of `split` from `source`: 'embedded', 'real', a .jsonl file, an image folder or
    'hf:NAME[:SPLIT]'.

    `shared`: the source serves both calibration and evaluation, so each gets its own part of it."""
    if source == EMBEDDED:
        return embedded(split, n, seed)
    if source == REAL:
        return real_mix(split, n, seed)
    if source.startswith("hf:"):
        name, _, hf_split = source[3:].partition(":")
        samples = hf_dataset(name, hf_split or "train")
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            samples = image_folder(path)
        elif path.suffix == ".jsonl" or path.is_file():
            samples = jsonl(path)
        else:
            raise FP8MixError(f"data source {source} not found; pass 'embedded', 'real', a .jsonl file, an image "
                              "folder or hf:NAME")
    if not shared:
        order = list(range(len(samples)))
        random.Random(f"fp8mix-calib:{seed}").shuffle(order)
        return [samples[i] for i in order[:n]]
    return _split(samples, split, n, seed)


def _split(samples: list[ChatSample], split: str, n: int, seed: int) -> list[ChatSample]:
    """User data serves both sets: a fixed quarter (by a seed-independent shuffle) is evaluation, the rest
    calibration; the seed then picks which calibration samples are used."""
    order = list(range(len(samples)))
    random.Random("fp8mix-split").shuffle(order)
    n_eval = max(1, len(samples) // 4) if len(samples) > 1 else 0
    chosen = order[:n_eval] if split == "eval" else order[n_eval:]
    if split != "eval":
        random.Random(f"fp8mix-calib:{seed}").shuffle(chosen)
    if not chosen:
        raise FP8MixError(f"not enough samples for a {split} set ({len(samples)} in all; need at least 2)")
    return [samples[i] for i in chosen[:n]]


def assert_disjoint(calib: list[ChatSample], evaluation: list[ChatSample]) -> None:
    shared = {s.fingerprint() for s in calib} & {s.fingerprint() for s in evaluation}
    if shared:
        raise FP8MixError(f"{len(shared)} sample(s) appear in both the calibration and the evaluation set; "
                          "pass a different --eval-data")


def digest(source: str) -> str | None:
    """A hash of a local source's samples (text and pixels), None for the built-in and hub sources: a file or
    folder edited since it was scored gives other scoring settings, so it is scored again."""
    if source in (EMBEDDED, REAL) or source.startswith("hf:"):
        return None
    path = Path(source).expanduser().resolve()
    if not path.exists():
        return None  # load() says so
    st = path.stat()
    return _digest(str(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=8)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    p = Path(path)
    h = hashlib.sha256()
    for s in image_folder(p) if p.is_dir() else jsonl(p):
        h.update(s.fingerprint().encode())
    return h.hexdigest()[:16]


EVAL_SEED = 0


def held_out(source: str, n: int) -> list[ChatSample]:
    """The held-out evaluation samples of a source (eval, the study's control, served checks): never calibrated on."""
    return load(source, "eval", n, EVAL_SEED)
